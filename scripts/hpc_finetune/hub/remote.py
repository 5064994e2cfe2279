"""git against the hub: the environment every call runs in (the token only as an HTTP header, never in a URL,
argument, file or log), what a failed call means for the user, and resolving and cloning a revision.
"""

from __future__ import annotations

import os
import shutil
import socket
from contextlib import suppress
from pathlib import Path

from hpc_finetune.git import GitError, git
from hpc_finetune.hub.request import FULL_SHA, SHORT_SHA, Request
from hpc_finetune.io.cli import StageError, log

OFFLINE = ("could not resolve host", "failed to connect", "connection refused", "timed out", "network is unreachable")
DENIED = (
    "not found", "does not appear to be a git repository", "401", "403", "404", "authentication failed",
    "could not read username", "terminal prompts disabled", "access denied", "unauthorized", "forbidden",
)


def git_env(hub_url: str, token: str | None) -> dict[str, str]:
    """Environment of every git call: no prompts, no LFS download at checkout, no tracing of HTTP headers, and
    the token as an Authorization header for the hub's URLs only. Credential helpers are switched off when a
    token is given, so that none of them stores it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_TRACE", "GIT_CURL_VERBOSE"))}
    env.update(GIT_TERMINAL_PROMPT="0", GIT_LFS_SKIP_SMUDGE="1", GCM_INTERACTIVE="never")
    settings: list[tuple[str, str]] = []
    if token:
        header = f"http.{hub_url.rstrip('/')}.extraHeader"
        settings = [(header, ""), (header, f"Authorization: Bearer {token}"), ("credential.helper", "")]
    count = int(env.get("GIT_CONFIG_COUNT") or 0)
    for i, (key, value) in enumerate(settings, start=count):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    env["GIT_CONFIG_COUNT"] = str(count + len(settings))
    return env


class Git:
    """git as the hub cache runs it: in git_env's environment, the token redacted from every error."""

    def __init__(self, req: Request):
        self.req = req
        self.env = git_env(req.hub_url, req.token)

    def __call__(self, *args: str, cwd: Path | None = None, stdin: str | bytes | None = None, binary: bool = False):
        return git(*args, cwd=cwd, env=self.env, stdin=stdin, binary=binary, secret=self.req.token)

    def redact(self, text: str) -> str:
        return text.replace(self.req.token, "***") if self.req.token else text

    def remote_error(self, err: GitError, doing: str) -> StageError:
        """What a failed network call means for the user, and the fix."""
        req, text = self.req, str(err)
        lines = [line for line in text.splitlines() if line.strip()]
        said = lines[-1] if lines else text
        low = text.lower()
        if any(s in low for s in OFFLINE):
            return StageError(
                f"model {req.label}: cannot reach {req.hub_url} from {socket.gethostname()} while {doing} ({said}). "
                "Run the model stage on a node with internet access (send rule `model` to a login or transfer "
                "partition in your profile, or run `snakemake --until model` on the login node); once the model "
                "is cached, later runs need no network"
            )
        if any(s in low for s in DENIED):
            token = "the token that is set" if req.token else "no token is set now"
            return StageError(
                f"model {req.label}: {req.url} does not exist or refuses access while {doing} ({said}). Check "
                f"model.model_id (org/name as on the hub page). If the model is gated or private, accept its "
                f"license on {req.url} and give a token that has access: HF_TOKEN in the environment or "
                f"model.token_file ({token})"
            )
        return StageError(f"model {req.label}: git failed while {doing} {req.url}: {said}")


def require_tools(req: Request) -> None:
    host = socket.gethostname()
    try:
        git("--version")
    except GitError:
        raise StageError(
            f"model {req.label}: git is not installed on {host}; install git and git-lfs on the nodes that run "
            "the model stage"
        ) from None
    try:
        git("lfs", "version")
    except GitError:
        raise StageError(
            f"model {req.label}: git-lfs is not installed on {host} (`git lfs version` fails); install it on the "
            "nodes that run the model stage (apt-get install git-lfs, dnf install git-lfs, conda install -c "
            "conda-forge git-lfs, or `module load git-lfs`)"
        ) from None


def remote_refs(git: Git) -> dict[str, str]:
    try:
        out = git("ls-remote", git.req.url)
    except GitError as err:
        raise git.remote_error(err, "listing the branches and tags of") from None
    return {ref: sha for sha, ref in (line.split("\t", 1) for line in out.splitlines() if "\t" in line)}


def unknown_revision(git: Git, refs: dict[str, str]) -> StageError:
    branches = sorted(r.removeprefix("refs/heads/") for r in refs if r.startswith("refs/heads/"))
    tags = sorted({r.removeprefix("refs/tags/").removesuffix("^{}") for r in refs if r.startswith("refs/tags/")})
    req = git.req
    return StageError(
        f"model {req.model_id}: revision {req.revision!r} is not a branch, tag or commit of {req.url} "
        f"(branches: {', '.join(branches[:20]) or 'none'}; tags: {', '.join(tags[:20]) or 'none'}); set "
        "model.revision to one of them or to a full commit SHA"
    )


def resolve_remote(git: Git) -> str | None:
    """The commit that the revision names on the remote now; None for an abbreviated SHA (found after cloning)."""
    rev = git.req.revision
    refs = remote_refs(git)
    for name in (rev, f"refs/heads/{rev}", f"refs/tags/{rev}^{{}}", f"refs/tags/{rev}"):
        if name in refs:
            return refs[name]
    if SHORT_SHA.fullmatch(rev):
        return None
    raise unknown_revision(git, refs)


def checked_out(git: Git, snap: Path, commit: str) -> bool:
    if not (snap / ".git").is_dir():
        return False
    try:
        return git("rev-parse", "HEAD", cwd=snap).strip() == commit
    except GitError:
        return False


def find_commit(git: Git, repo: Path, target: str) -> str:
    """The full SHA of a commit, tag or abbreviated SHA in a fresh clone."""

    def rev_parse() -> str | None:
        try:
            return git("rev-parse", "--verify", "--quiet", f"{target}^{{commit}}", cwd=repo).strip()
        except GitError:
            return None

    commit = rev_parse()
    if commit is None and FULL_SHA.fullmatch(target):
        with suppress(GitError):  # a commit that no branch or tag contains (e.g. refs/pr/N): ask for it
            git("fetch", "--quiet", "origin", target, cwd=repo)
        commit = rev_parse()
    if commit is None:
        raise unknown_revision(git, remote_refs(git))
    return commit


def clone(git: Git, root: Path, commit: str | None) -> str:
    """Clone without LFS content into .incoming, check out the commit (or the abbreviated SHA), and move the
    checkout to snapshots/{commit}. Returns the full commit SHA."""
    incoming = root / ".incoming"
    if incoming.exists():
        log.warning("%s: removing %s, left by an interrupted clone", git.req.label, incoming)
        shutil.rmtree(incoming)
    log.info("%s: cloning %s (LFS content comes next)", git.req.label, git.req.url)
    try:
        git("clone", "--quiet", "--no-checkout", git.req.url, str(incoming))
    except GitError as err:
        raise git.remote_error(err, "cloning") from None
    full = find_commit(git, incoming, commit or git.req.revision)
    git("checkout", "--quiet", "--detach", full, cwd=incoming)
    snap = root / "snapshots" / full
    if snap.exists():
        log.warning("%s: replacing the broken checkout %s", git.req.label, snap)
        shutil.rmtree(snap)
    snap.parent.mkdir(exist_ok=True)
    incoming.rename(snap)
    return full


