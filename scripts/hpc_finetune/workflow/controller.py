"""What the main Snakemake process of a run does besides scheduling (workflow/rules/controller.smk): one
controller per run (runlock), and the run's deliverables against its manifest. README, "Re-running only what
changed".

- At parse time, unless a live controller holds the run: what killed jobs left beside a finished deliverable
  directory is removed, and a deliverable directory (adapters/, merged/, the demo model) that lost a file the manifest lists
  since the manifest was written is set aside as .<name>.damaged, so that Snakemake sees it missing and rebuilds it
  with its stage and what depends on it (a missing file or directory is a target: rule all rebuilds it anyway).
- onstart (a run that executes jobs): the run's lock, or a clear refusal.
- At exit (every invocation): the manifest compared with the disk. What it lists that is missing is named with
  the way to rebuild it, and a run that executed (not a dry run) exits non-zero: never a missing deliverable
  reported as success.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import typing
from pathlib import Path

from hpc_finetune.summary.manifest import missing_artifacts
from hpc_finetune.workflow import runlock

SHOWN = 8  # missing files named in a message; the rest counted


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def damaged(run_dir: Path, roots: list[str], missing: list[str]) -> list[Path]:
    """The directories among `roots` that are there but miss a file the manifest lists, and were complete when
    it was written (Snakemake's .snakemake_timestamp, touched when their job ended, is older than the manifest).
    A directory installed after the manifest (by a job whose controller was killed) is newer: not damaged."""
    manifest = run_dir / "manifest.json"
    found = []
    for root in map(Path, roots):
        stamp = root / ".snakemake_timestamp"
        prefix = f"{os.path.relpath(root, run_dir)}/"  # ../_shared/...: a stage the experiment's runs share
        if (root.is_dir() and any(path.startswith(prefix) for path in missing) and stamp.is_file()
                and stamp.stat().st_mtime <= manifest.stat().st_mtime):
            found.append(root)
    return found


def set_aside(directory: Path) -> Path:
    """Move a damaged deliverable out of Snakemake's sight (kept, not deleted; its stage removes it when it runs)."""
    aside = directory.with_name(f".{directory.name}.damaged")
    shutil.rmtree(aside, ignore_errors=True)
    directory.rename(aside)
    return aside


def leftovers(roots: list[str]) -> list[Path]:
    """What killed jobs left beside the deliverable directories that are there now (so superseded): their
    temporary (.<name>.partial-<pid>, .<name>.tmp), replaced (.<name>.old...) and set-aside (.<name>.damaged)
    directories. Those of a missing deliverable are its stage's to remove or reuse when it runs."""
    return [path for root in map(Path, roots) if root.is_dir()
            for path in sorted(root.parent.glob(f".{root.name}.*")) if path.is_dir()]


def listing(paths: list[str]) -> str:
    more = f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else ""
    return ", ".join(paths[:SHOWN]) + more


class Controller:
    """The run's controller-side checks; `workflow` is Snakemake's (read at exit: did this invocation execute jobs,
    was it a dry run)."""

    def __init__(self, run_dir: str, roots: list[str], workflow: typing.Any):
        self.run_dir, self.roots, self.workflow = Path(run_dir), roots, workflow
        self.lock: typing.IO | None = None

    def at_parse(self) -> None:
        if runlock.holder(self.run_dir):  # a live controller owns the outputs: leave them alone
            return
        for path in leftovers(self.roots):
            shutil.rmtree(path, ignore_errors=True)
            say(f"removed {path}, left by an interrupted job")
        missing = missing_artifacts(self.run_dir / "manifest.json")
        for directory in damaged(self.run_dir, self.roots, missing):
            aside = set_aside(directory)
            say(f"{directory} misses files that {self.run_dir}/manifest.json lists "
                f"({listing([p for p in missing if p.startswith(f'{directory.name}/')])}): set aside as {aside}; "
                f"its stage rebuilds it.")

    def on_start(self) -> None:
        """Take the run's lock (raises runlock.RunInUse with the message for the user)."""
        self.lock, note = runlock.take(self.run_dir)
        if note:
            say(f"Note: {note}")

    def at_exit(self) -> None:
        if self.lock is not None:
            runlock.release(self.lock)
        missing = missing_artifacts(self.run_dir / "manifest.json")
        if not missing:
            return
        running = runlock.holder(self.run_dir)  # another controller's run (this one was refused, or a dry run)
        executed = (getattr(self.workflow, "executor_plugin", None) is not None and not self.workflow.dryrun
                    and not running)
        say(f"{'Error' if executed else 'Warning'}: {self.run_dir}/manifest.json lists {len(missing)} file(s) that "
            f"are not on disk: {listing(missing)}.\n"
            + (f"The run is in progress ({running}); it may be rebuilding them.\n" if running else "")
            + "They are targets of the run: run the workflow again without a target (the same `snakemake --profile "
              "...` command, no file names) to rebuild them with their stage and what depends on them.")
        if executed:  # a deliverable missing after a run must not look like success
            logging.shutdown()
            sys.stdout.flush()
            os._exit(1)
