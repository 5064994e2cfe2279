"""The shared cache of hub models fetched with git-lfs: pinned to a commit, checked before it is reused,
repaired when a fetch was cut off, serialised by a lock, and never holding the token. Used by prepare_model.py.

    {model_cache_dir}/{org}/{name}/
        .lock                 flock held while one run resolves, fetches or checks this model
        refs/{revision}       the commit a branch or tag resolved to when first fetched: the pin (name url-quoted)
        lfs/                  git-lfs object store shared by the snapshots (lfs.storage)
        snapshots/{commit}/   the model directory: a checkout of that commit whose LFS files are hard links to
                              the verified objects; .git inside (its config holds no credentials)
        .incoming/            a clone in progress; the next run removes one left by a killed run

The token (HF_TOKEN or model.token_file) reaches git and git-lfs only as an `http.<hub_url>.extraHeader` set
in their environment (GIT_CONFIG_COUNT): never in a URL, an argument, a file or a log line.
"""

from __future__ import annotations

import tempfile
import urllib.parse
from pathlib import Path

from hpc_finetune.hub.remote import Git, checked_out, clone, require_tools, resolve_remote
from hpc_finetune.hub.request import FULL_SHA, Request, check_request
from hpc_finetune.hub.snapshot import Snapshot
from hpc_finetune.io.cli import StageError, log
from hpc_finetune.io.files import locked, write_text

# --- cache directory, lock and pins ---------------------------------------------------------------------------


def cache_root(req: Request) -> Path:
    """{cache}/{org}/{name}, created and proven writable."""
    try:
        req.root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=req.root, prefix=".write-test-"):
            pass
    except OSError as err:
        raise StageError(
            f"model {req.label}: the model cache {req.cache_dir} is not writable ({err.strerror or err}); set "
            "model.model_cache_dir to a directory you can write, on a file system that the cluster's nodes share"
        ) from None
    return req.root


def ref_file(root: Path, revision: str) -> Path:
    return root / "refs" / urllib.parse.quote(revision, safe="")


def pinned_commit(root: Path, req: Request) -> str | None:
    """The commit without asking the remote: a full SHA is its own pin; a branch or tag resolves to what the
    cache recorded when it was first fetched, unless an update is asked for."""
    if FULL_SHA.fullmatch(req.revision):
        return req.revision
    path = ref_file(root, req.revision)
    if req.update or not path.is_file():
        return None
    commit = path.read_text().strip()
    return commit if FULL_SHA.fullmatch(commit) else None


def remember(root: Path, req: Request, commit: str) -> None:
    path = ref_file(root, req.revision)
    previous = path.read_text().strip() if path.is_file() else None
    if previous != commit:
        if previous:
            log.info("%s: the pin moves from %s to %s", req.label, previous, commit)
        write_text(path, commit + "\n")


# --- entry point ----------------------------------------------------------------------------------------------


def fetch(req: Request) -> tuple[Path, str, dict]:
    """Make model_id@revision complete in the cache. Returns (model directory, commit, what was done).

    A branch or tag is resolved against the remote only when the cache has no pin for it or req.update is set;
    a complete snapshot of a pinned commit is checked and reused without any network access."""
    check_request(req)
    require_tools(req)
    root = cache_root(req)
    git = Git(req)
    with locked(root / ".lock", f"{req.label}: waiting for {{holder}}, which is fetching or checking this model (lock "
                f"{root / '.lock'})", "put model.model_cache_dir on a file system that supports locks (local disk, "
                "NFSv4, Lustre or GPFS mounted with flock)"):
        commit = pinned_commit(root, req) or resolve_remote(git)
        if commit is None or not checked_out(git, root / "snapshots" / commit, commit):
            commit = clone(git, root, commit)
        if commit != req.revision:
            remember(root, req, commit)
        snapshot = Snapshot(git, root, commit)
        done = snapshot.complete()
    return snapshot.path, commit, done
