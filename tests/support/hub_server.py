"""A Hugging Face Hub-protocol server on loopback for the tests: what the real `huggingface_hub` client calls to
create a repo and a branch, ask who a token belongs to, pre-upload (regular vs LFS), upload LFS objects through the
batch API (basic and multipart transfers, with HF_HUB_DISABLE_XET=1), commit (NDJSON), and read back: repo info,
the recursive tree, and /resolve downloads with the Hub's headers (X-Repo-Commit, X-Linked-Etag, X-Linked-Size).

No Hub is reachable from the test machines and none installs offline (../shared/NOTES.md), so this stands in for
it; the client under test is the real one, pointed here with HF_ENDPOINT. Error responses carry the Hub's
X-Error-Code / X-Error-Message headers, from which the client raises its typed errors.

Tokens: `tokens` maps a token to its user, its role (read/write) and its organisations. Test hooks: `fail` (a
status for the next N requests whose path contains a text), `hold_after` (LFS uploads past the first N wait until
released: a run can be killed half-way), and counters of what was received.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".gguf", ".parquet", ".arrow", ".npy", ".zip")
LFS_MIN_SIZE = 10 << 20  # the Hub stores larger files in LFS whatever their name
REPO_KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Entry:
    size: int
    oid: str  # the git blob oid (of the content, or of the LFS pointer)
    sha256: str | None = None  # LFS files only
    data: bytes | None = None  # regular files only


@dataclass
class Repo:
    kind: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, Entry]] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)


class HubState:
    def __init__(self, root: Path, multipart_chunk: int = 8 << 20):
        self.root = root
        (root / "lfs").mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.tokens: dict[str, dict] = {}
        self.multipart_chunk = multipart_chunk
        self.lock = threading.Lock()
        self.received = {"lfs_objects": 0, "lfs_bytes": 0, "commits": 0, "regular_files": 0}
        self.requests: list[str] = []
        self.failures: list[list] = []  # [path text, status, remaining]
        self.hold_after: int | None = None
        self.held = threading.Event()
        self.release = threading.Event()

    def add_token(self, token: str, user: str, role: str = "write", orgs: tuple[str, ...] = ()) -> None:
        self.tokens[token] = {"user": user, "role": role, "orgs": list(orgs)}

    def fail(self, path_text: str, status: int, times: int = 1) -> None:
        self.failures.append([path_text, status, times])

    def lfs_path(self, sha256: str) -> Path:
        return self.root / "lfs" / sha256

    def commit(self, repo: Repo, branch: str, files: dict[str, Entry], message: str) -> str:
        parent = repo.branches.get(branch, "")
        sha = hashlib.sha1(json.dumps([parent, message, time.time_ns(), sorted(
            (p, e.oid) for p, e in files.items())]).encode()).hexdigest()
        repo.commits[sha], repo.messages[sha], repo.branches[branch] = files, message, sha
        return sha


class Refused(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, *_args) -> None:
        pass

    @property
    def state(self) -> HubState:
        return self.server.state  # type: ignore[attr-defined]

    # --- plumbing ---------------------------------------------------------------------------------------------

    def body(self) -> bytes:
        """The request body, read once (every request's body is read, so the connection stays in step)."""
        if getattr(self, "_body", None) is None:
            self._body = self.read_body()
        return self._body

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def reply(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def user(self, write: bool, namespace: str | None = None) -> dict | None:
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        if token is None:
            if write:
                raise Refused(401, "Invalid username or password.")
            return None
        who = self.state.tokens.get(token)
        if who is None:
            raise Refused(401, "Invalid credentials in Authorization header")
        if write and who["role"] != "write":
            raise Refused(403, "This token has read access only: you need a token with write access")
        if write and namespace and namespace not in (who["user"], *who["orgs"]):
            raise Refused(403, f"You don't have the rights to write under the namespace {namespace}")
        return who

    def repo(self, kind: str, repo_id: str, write: bool = False) -> Repo:
        who = self.user(write, repo_id.split("/")[0])
        repo = self.state.repos.get((kind, repo_id))
        if repo is None or (repo.private and who is None):
            raise Refused(404 if who else 401, "Repository Not Found", "RepoNotFound")
        return repo

    def revision(self, repo: Repo, revision: str) -> str:
        revision = urllib.parse.unquote(revision)
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise Refused(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def dispatch(self) -> None:
        path = urllib.parse.urlsplit(self.path)
        self.state.requests.append(f"{self.command} {path.path}")
        for failure in self.state.failures:
            if failure[0] in path.path and failure[2] > 0:
                failure[2] -= 1
                raise Refused(failure[1], "Internal Error - We're working hard to fix this as soon as possible!")
        query = urllib.parse.parse_qs(path.query)
        routes = [
            (r"/api/whoami-v2", self.whoami),
            (r"/api/repos/create", self.create_repo),
            (r"/api/validate-yaml", lambda: self.reply(200, {"errors": [], "warnings": []})),
            (r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/preupload/(.+)", self.preupload),
            (r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/commit/(.+)", self.commit),
            (r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/branch/(.+)", self.create_branch),
            (r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", self.tree),
            (r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/revision/(.+))?", self.info),
            (r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch", self.lfs_batch),
            (r"/lfs/upload/([0-9a-f]{64})(?:/(\d+))?", self.lfs_put),
            (r"/lfs/complete/([0-9a-f]{64})", self.lfs_complete),
            (r"/lfs/verify/([0-9a-f]{64})", self.lfs_verify),
            (r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.resolve),
        ]
        for pattern, handler in routes:
            if found := re.fullmatch(pattern, path.path):
                return handler(*found.groups(), query=query) if found.groups() else handler()
        raise Refused(404, f"no route for {self.command} {path.path}")

    def handle_any(self) -> None:
        self._body = None
        try:
            self.body()
            self.dispatch()
        except Refused as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            self.reply(err.status, {"error": err.message, **err.extra}, headers)

    do_GET = do_POST = do_PUT = do_HEAD = handle_any

    # --- the API ----------------------------------------------------------------------------------------------

    def whoami(self) -> None:
        who = self.user(write=False)
        if who is None:
            raise Refused(401, "Invalid username or password.")
        self.reply(200, {"type": "user", "name": who["user"], "orgs": [{"name": o} for o in who["orgs"]],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": who["role"]}}})

    def create_repo(self) -> None:
        spec = json.loads(self.body())
        repo_id = f"{spec.get('organization') or self.user(True)['user']}/{spec['name']}"
        self.user(True, repo_id.split("/")[0])
        kind = spec.get("type") or "model"
        url = f"http://{self.headers['Host']}/{'' if kind == 'model' else kind + 's/'}{repo_id}"
        if (kind, repo_id) in self.state.repos:
            raise Refused(409, "You already created this repo", url=url)
        repo = Repo(kind, spec.get("visibility", "private" if spec.get("private") else "public") == "private")
        attributes = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
        self.state.commit(repo, "main", {".gitattributes": Entry(len(attributes), git_blob_oid(attributes),
                                                                 data=attributes)}, "initial commit")
        self.state.repos[(kind, repo_id)] = repo
        self.reply(200, {"url": url, "name": repo_id})

    def create_branch(self, kinds: str, repo_id: str, branch: str, query) -> None:
        repo = self.repo(REPO_KINDS[kinds], repo_id, write=True)
        spec = json.loads(self.body() or b"{}")
        branch = urllib.parse.unquote(branch)
        if branch in repo.branches:
            raise Refused(409, f"Reference refs/heads/{branch} already exists")
        repo.branches[branch] = self.revision(repo, spec.get("startingPoint") or "main")
        self.reply(200, {})

    def info(self, kinds: str, repo_id: str, revision: str | None, query) -> None:
        repo = self.repo(REPO_KINDS[kinds], repo_id)
        sha = self.revision(repo, revision or "main")
        files = repo.commits[sha]
        self.reply(200, {"id": repo_id, "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "sha": sha,
                         "private": repo.private, "tags": [], "downloads": 0, "likes": 0,
                         "siblings": [{"rfilename": p} for p in sorted(files)],
                         "lastModified": "2026-12-02T00:00:00.000Z"})

    def tree(self, kinds: str, repo_id: str, revision: str, under: str | None, query) -> None:
        repo = self.repo(REPO_KINDS[kinds], repo_id)
        files = repo.commits[self.revision(repo, revision)]
        prefix = f"{under.strip('/')}/" if under else ""
        entries, dirs = [], set()
        for path in sorted(p for p in files if p.startswith(prefix)):
            entry = files[path]
            item = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
            if entry.sha256:
                item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": 134}
            entries.append(item)
            dirs.update("/".join(path.split("/")[:n]) for n in range(1, path.count("/") + 1))
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)]
        self.reply(200, entries)

    def preupload(self, kinds: str, repo_id: str, revision: str, query) -> None:
        repo = self.repo(REPO_KINDS[kinds], repo_id, write=True)
        files = repo.commits[self.revision(repo, revision)]
        answer = []
        for spec in json.loads(self.body())["files"]:
            sample = base64.b64decode(spec["sample"])
            lfs = spec["path"].endswith(LFS_SUFFIXES) or spec["size"] >= LFS_MIN_SIZE or b"\0" in sample
            known = files.get(spec["path"])
            oid = None if known is None else known.sha256 if lfs else (known.oid if not known.sha256 else None)
            answer.append({"path": spec["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                           "oid": oid})
        self.reply(200, {"files": answer, "commitOid": repo.branches.get(urllib.parse.unquote(revision))})

    def lfs_batch(self, kinds: str | None, repo_id: str, query) -> None:
        self.repo("model" if kinds is None else kinds[:-1], repo_id, write=True)
        spec = json.loads(self.body())
        base = f"http://{self.headers['Host']}/lfs"
        objects = []
        for obj in spec["objects"]:
            oid, size = obj["oid"], obj["size"]
            item = {"oid": oid, "size": size}
            if not self.state.lfs_path(oid).exists():  # known objects get no actions: the client skips them
                upload = {"href": f"{base}/upload/{oid}", "header": {}}
                if size > self.state.multipart_chunk:
                    parts = -(-size // self.state.multipart_chunk)
                    upload = {"href": f"{base}/complete/{oid}", "header": {
                        "chunk_size": str(self.state.multipart_chunk),
                        **{f"{n:05d}": f"{base}/upload/{oid}/{n}" for n in range(1, parts + 1)}}}
                item["actions"] = {"upload": upload, "verify": {"href": f"{base}/verify/{oid}", "header": {}}}
            objects.append(item)
        self.reply(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_put(self, oid: str, part: str | None, query) -> None:
        state = self.state
        data = self.body()
        with state.lock:
            held = state.hold_after is not None and state.received["lfs_objects"] >= state.hold_after
        if held:
            state.held.set()
            state.release.wait(120)
            raise Refused(503, "held by the test")
        if part is None:
            if hashlib.sha256(data).hexdigest() != oid:
                raise Refused(400, f"the body's sha256 is not {oid}")
            self.store(oid, data)
            return self.reply(200)
        (state.root / "lfs" / f"{oid}.part{int(part):05d}").write_bytes(data)
        self.reply(200, headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def lfs_complete(self, oid: str, query) -> None:
        spec = json.loads(self.body())
        parts = [self.state.root / "lfs" / f"{oid}.part{p['partNumber']:05d}" for p in spec["parts"]]
        digest, tmp = hashlib.sha256(), self.state.lfs_path(oid).with_suffix(".tmp")
        with open(tmp, "wb") as whole:  # part by part: a multi-GB object never sits in memory
            for part in parts:
                data = part.read_bytes()
                digest.update(data)
                whole.write(data)
        if digest.hexdigest() != oid:
            tmp.unlink()
            raise Refused(400, f"the parts do not add up to {oid}")
        for part in parts:
            part.unlink()
        self.stored(oid, tmp)
        self.reply(200)

    def store(self, oid: str, data: bytes) -> None:
        tmp = self.state.lfs_path(oid).with_suffix(".tmp")
        tmp.write_bytes(data)
        self.stored(oid, tmp)

    def stored(self, oid: str, tmp: Path) -> None:
        size = tmp.stat().st_size
        tmp.replace(self.state.lfs_path(oid))
        with self.state.lock:
            self.state.received["lfs_objects"] += 1
            self.state.received["lfs_bytes"] += size

    def lfs_verify(self, oid: str, query) -> None:
        spec = json.loads(self.body())
        path = self.state.lfs_path(oid)
        if not path.exists() or path.stat().st_size != spec["size"]:
            raise Refused(404, f"object {oid} not found")
        self.reply(200, {})

    def commit(self, kinds: str, repo_id: str, revision: str, query) -> None:
        repo = self.repo(REPO_KINDS[kinds], repo_id, write=True)
        branch = urllib.parse.unquote(revision)
        files = dict(repo.commits[self.revision(repo, branch)])
        lines = [json.loads(line) for line in self.body().splitlines() if line.strip()]
        header = lines[0]["value"]
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                data = base64.b64decode(value["content"])
                files[value["path"]] = Entry(len(data), git_blob_oid(data), data=data)
                self.state.received["regular_files"] += 1
            elif line["key"] == "lfsFile":
                path = self.state.lfs_path(value["oid"])
                if not path.exists():
                    raise Refused(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{value['oid']}\n"
                           f"size {path.stat().st_size}\n").encode()
                files[value["path"]] = Entry(path.stat().st_size, git_blob_oid(pointer), sha256=value["oid"])
            elif line["key"] == "deletedFile":
                files.pop(value["path"], None)
            elif line["key"] == "deletedFolder":
                files = {p: e for p, e in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
        sha = self.state.commit(repo, branch, files, header["summary"])
        self.state.received["commits"] += 1
        self.reply(200, {"commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{sha}", "commitOid": sha,
                         "success": True})

    def resolve(self, kinds: str | None, repo_id: str, revision: str, path: str, query) -> None:
        repo = self.repo("model" if kinds is None else kinds[:-1], repo_id)
        sha = self.revision(repo, revision)
        entry = repo.commits[sha].get(urllib.parse.unquote(path))
        if entry is None:
            raise Refused(404, "Entry not found", "EntryNotFound")
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry.sha256 or entry.oid}"'}
        if entry.sha256 is None:
            return self.reply(200, headers=headers, raw=entry.data)
        headers |= {"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)}
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(entry.size))
        self.end_headers()
        if self.command != "HEAD":
            with open(self.state.lfs_path(entry.sha256), "rb") as fh:
                while chunk := fh.read(8 << 20):
                    self.wfile.write(chunk)


@contextmanager
def hub_server(root: Path, **options):
    """Serve a HubState on a free loopback port; yields (endpoint, state)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.state = HubState(root, **options)  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.state  # type: ignore[attr-defined]
    finally:
        server.state.release.set()  # type: ignore[attr-defined]
        server.shutdown()
        server.server_close()
