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

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from common import StageError, locked, log, write_text

FULL_SHA = re.compile(r"[0-9a-f]{40}")
SHORT_SHA = re.compile(r"[0-9a-f]{7,39}")
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
REVISION = re.compile(r"(?!.*\.\.)(?!.*//)[A-Za-z0-9][A-Za-z0-9._/+-]*")
TOKEN = re.compile(r"[\x21-\x7e]+")
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
# Weight formats a repository may hold besides the one a loader reads; only the loader's files are fetched.
WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".ggml", ".h5", ".msgpack", ".onnx", ".onnx_data",
    ".ot", ".tflite", ".mlmodel", ".nemo", ".npz",
)
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
OFFLINE = ("could not resolve host", "failed to connect", "connection refused", "timed out", "network is unreachable")
DENIED = (
    "not found", "does not appear to be a git repository", "401", "403", "404", "authentication failed",
    "could not read username", "terminal prompts disabled", "access denied", "unauthorized", "forbidden",
)
PROGRESS_EVERY_S = 30


def pick_weights(names: set[str], read_index: Callable[[str], dict]) -> tuple[str | None, list[str]]:
    """The weight files a loader reads, chosen by name: the safetensors index's shards or model.safetensors,
    else the .bin equivalents. Returns (index file or None, weight files); no weights gives (None, [])."""
    for index, single in WEIGHT_LAYOUTS:
        if index in names:
            return index, sorted(set(read_index(index)["weight_map"].values()))
        if single in names:
            return None, [single]
    return None, []


def is_lfs_pointer(path: Path) -> bool:
    """A file that git checked out without git-lfs: the pointer text instead of the content."""
    return path.is_file() and path.stat().st_size < 1024 and path.read_bytes().startswith(LFS_POINTER)


# --- the request and the token ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    model_id: str
    revision: str
    hub_url: str
    cache_dir: Path
    token: str | None = field(default=None, repr=False)
    update: bool = False
    min_free_bytes: int = 0

    @property
    def label(self) -> str:
        return f"{self.model_id}@{self.revision}"

    @property
    def url(self) -> str:
        return f"{self.hub_url.rstrip('/')}/{self.model_id}"

    @property
    def root(self) -> Path:
        return self.cache_dir / self.model_id


def read_token(token_file: str | None, model_id: str) -> str | None:
    """The hub token: the contents of model.token_file when set, else HF_TOKEN. Its value is never logged."""
    if not token_file:
        return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None
    path = Path(os.path.expandvars(token_file)).expanduser()
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise StageError(
            f"model {model_id}: model.token_file {path} cannot be read ({getattr(err, 'strerror', None) or err}); "
            "point it at a file that holds your hub token, or unset it and export HF_TOKEN"
        ) from None
    if not TOKEN.fullmatch(token):
        raise StageError(
            f"model {model_id}: model.token_file {path} is empty or holds more than one token (spaces or control "
            "characters); write the token alone into it"
        )
    return token


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


# --- git ------------------------------------------------------------------------------------------------------


class GitError(Exception):
    """A git command failed; the message is git's own, with the token redacted."""


class Git:
    def __init__(self, req: Request):
        self.req = req
        self.env = git_env(req.hub_url, req.token)

    def __call__(self, *args: str, cwd: Path | None = None, stdin: str | bytes | None = None, binary: bool = False):
        result = subprocess.run(
            ["git", *args], cwd=cwd, env=self.env, input=stdin, capture_output=True, text=not binary
        )
        if result.returncode != 0:
            said = [out if not binary else out.decode(errors="replace") for out in (result.stderr, result.stdout)]
            text = "\n".join(part.strip() for part in said if part.strip())
            raise GitError(self.redact(text) or f"git {args[0]} exited with status {result.returncode}")
        return result.stdout

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
        subprocess.run(["git", "--version"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        raise StageError(
            f"model {req.label}: git is not installed on {host}; install git and git-lfs on the nodes that run "
            "the model stage"
        ) from None
    if subprocess.run(["git", "lfs", "version"], capture_output=True).returncode != 0:
        raise StageError(
            f"model {req.label}: git-lfs is not installed on {host} (`git lfs version` fails); install it on the "
            "nodes that run the model stage (apt-get install git-lfs, dnf install git-lfs, conda install -c "
            "conda-forge git-lfs, or `module load git-lfs`)"
        )


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


# --- one snapshot: what it holds, verify, fetch, link -----------------------------------------------------------


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
            self.download(missing, needed)
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


# --- entry point ----------------------------------------------------------------------------------------------


def check_request(req: Request) -> None:
    """The id and revision become cache paths: refuse what could escape the cache or collide."""
    if not MODEL_ID.fullmatch(req.model_id or ""):
        raise StageError(
            f"model.model_id {req.model_id!r} is not a hub id org/name (e.g. meta-llama/Llama-3.1-8B-Instruct); "
            "use the full id shown on the model's hub page"
        )
    if not REVISION.fullmatch(req.revision or ""):
        raise StageError(
            f"model {req.model_id}: model.revision {req.revision!r} is not a branch, tag or commit name; set it to "
            "one (e.g. main, v1.0 or a commit SHA)"
        )
    url = urllib.parse.urlsplit(req.hub_url)
    if url.scheme not in ("https", "http", "file"):
        raise StageError(
            f"model {req.model_id}: model.hub_url {req.hub_url!r} is not an https://, http:// or file:// URL"
        )
    if url.username or url.password:
        raise StageError(
            f"model {req.model_id}: model.hub_url holds credentials; remove them and give the token through "
            "HF_TOKEN or model.token_file, which never reach the cache's git config"
        )


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
