"""Publishing a directory of the run to a Hugging Face Hub model repository through `huggingface_hub`: check the
token (who it is, write access), create the repository (private unless told otherwise) and the branch, compare the
local files with the branch's tree, and make one commit with what changed (the library sends an LFS object only
when the Hub does not have it, so an interrupted upload completes on the next run), deleting what the run no
longer has. Server errors and dropped connections are tried again with a doubling wait, a bounded number of times.

Errors are StageErrors that say what to do; the token is never part of one.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from hpc_finetune.io.cli import StageError, log
from hpc_finetune.io.files import sha256_file

KEEP_REMOTE = {".gitattributes"}
TRANSIENT = (429, 500, 502, 503, 504)


@dataclass
class Target:
    kind: str  # adapter | merged
    repo_id: str
    files: dict[str, Path]  # path in the repository -> local file
    extra: dict[str, bytes] = field(default_factory=dict)  # generated files (README.md)


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def explain(err: Exception, what: str, endpoint: str) -> StageError | None:
    """The StageError for a Hub error, or None when it is worth trying again (server error, connection)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        message = err.response.headers.get("X-Error-Message") or str(err).splitlines()[-1]
        if status in TRANSIENT:
            return None
        if status == 401:
            return StageError(f"{what}: the Hub at {endpoint} refused the token (401: {message}): it is invalid or "
                              f"expired. Create a token with write access ({endpoint}/settings/tokens) and give it "
                              "as HF_TOKEN or hub_upload.token_file")
        if status == 403:
            return StageError(f"{what}: the token may not write there (403: {message}). Use a token with write "
                              "access to that namespace (an organisation's admin grants it), or set "
                              "hub_upload.repo_id to a repository under your own user")
        return StageError(f"{what} failed: HTTP {status}: {message}")
    if isinstance(err, (httpx2.TransportError, ConnectionError, TimeoutError)):
        return None
    return StageError(f"{what} failed: {type(err).__name__}: {err}")


def with_retries(action, what: str, endpoint: str, retries: int, wait_s: float):
    """action(), tried again after transient errors up to `retries` times, waiting wait_s, 2*wait_s, ..."""
    for attempt in range(retries + 1):
        try:
            return action()
        except StageError:
            raise
        except Exception as err:  # noqa: BLE001 - explain() sorts the library's and the network's errors
            final = explain(err, what, endpoint)
            if final is not None:
                raise final from None
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            if attempt == retries:
                raise StageError(f"{what} failed after {retries + 1} tries ({reason}). Is {endpoint} reachable "
                                 "from this host (proxy: HTTPS_PROXY)? Files already sent stay on the Hub: run "
                                 "again to send the rest (hub_upload.retries sets the tries)") from None
            delay = wait_s * 2**attempt
            log.warning("%s: %s; trying again in %.1f s (%d of %d)", what, reason, delay, attempt + 1, retries)
            time.sleep(delay)


def check_token(api, endpoint: str) -> dict:
    """whoami: the token's user and organisations; refuse a read-only token before anything is created."""
    who = api.whoami()
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise StageError(f"hub upload: the token of {who.get('name')} is read-only; uploading needs a token with "
                         f"write access ({endpoint}/settings/tokens), as HF_TOKEN or hub_upload.token_file")
    return who


def ensure_repo(api, repo_id: str, private: bool, revision: str, endpoint: str) -> None:
    """The model repository and its branch, created when missing; a dataset or Space of that name is refused."""
    if not api.repo_exists(repo_id, repo_type="model"):
        for other in ("dataset", "space"):
            if api.repo_exists(repo_id, repo_type=other):
                raise StageError(f"hub_upload.repo_id {repo_id}: {endpoint} has it as a {other} repository, not a "
                                 "model one; choose another repo_id for the model")
        log.info("creating %s repository %s", "private" if private else "public", repo_id)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)


def remote_files(api, repo_id: str, revision: str) -> dict[str, tuple[str, bool]]:
    """path -> (sha256 for LFS files or git blob oid, is LFS) of the branch's files."""
    from huggingface_hub.hf_api import RepoFile

    return {f.path: ((f.lfs.sha256, True) if f.lfs else (f.blob_id, False))
            for f in api.list_repo_tree(repo_id, revision=revision, recursive=True) if isinstance(f, RepoFile)}


def publish(api, target: Target, revision: str, message: str) -> dict:
    """One commit to target.repo_id@revision with what differs from the branch; the record of every file."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    remote = remote_files(api, target.repo_id, revision)
    files, operations = [], []
    local = {p: (path.stat().st_size, sha256_file(path), path) for p, path in target.files.items()}
    local |= {p: (len(data), hashlib.sha256(data).hexdigest(), data) for p, data in target.extra.items()}
    for path_in_repo, (size, digest, source) in sorted(local.items()):
        known = remote.get(path_in_repo)
        if known and known[1]:
            same = known[0] == digest
        else:
            content = source if isinstance(source, bytes) else source.read_bytes() if known else b""
            same = bool(known) and known[0] == git_blob_oid(content)
        if not same:
            operations.append(CommitOperationAdd(path_in_repo, source if isinstance(source, bytes) else str(source)))
        files.append({"path": path_in_repo, "sha256": digest, "bytes": size,
                      "action": "unchanged" if same else "uploaded"})
    deleted = sorted(set(remote) - set(local) - KEEP_REMOTE)
    operations += [CommitOperationDelete(p) for p in deleted]
    sent = sum(f["bytes"] for f in files if f["action"] == "uploaded")
    log.info("%s -> %s@%s: %d files to send (%.1f MiB), %d unchanged, %d to delete", target.kind, target.repo_id,
             revision, len(files) - sum(f["action"] == "unchanged" for f in files), sent / 2**20,
             sum(f["action"] == "unchanged" for f in files), len(deleted))
    if operations:
        info = api.create_commit(target.repo_id, operations, commit_message=message, revision=revision)
        commit, url = info.oid, info.commit_url
    else:
        commit = api.repo_info(target.repo_id, revision=revision).sha
        url = None
    return {"kind": target.kind, "repo": target.repo_id, "revision": revision, "commit": commit, "commit_url": url,
            "files": files, "deleted": deleted, "uploaded_bytes": sent}
