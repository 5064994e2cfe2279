"""A hub on the loopback interface for the tests: git's smart HTTP protocol through `git http-backend` and the
git-lfs batch API, serving the bare repositories under a directory as {url}/{org}/{name}. Every request must
carry `Authorization: Bearer <token>` (a gated model); the server records what it saw. With `stall_downloads`,
LFS downloads send half an object and then hang, so that a test can kill a fetch mid-way."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BATCH = re.compile(r"^/(?P<repo>[^/]+/[^/]+?)(?:\.git)?/info/lfs/objects/batch$")
OBJECT = re.compile(r"^/lfs-objects/(?P<repo>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})$")
GIT = re.compile(r"^/(?P<repo>[^/]+/[^/]+?)(?:\.git)?(?P<rest>/info/refs|/git-upload-pack)$")


class LfsServer:
    def __init__(self, root: Path, token: str, stall_downloads: bool = False):
        self.root, self.token, self.stall_downloads = root, token, stall_downloads
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, authorised)
        self.download_started = threading.Event()
        self.release = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> LfsServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def repo(self, name: str) -> Path:
        return self.root / f"{name}.git" if (self.root / f"{name}.git").is_dir() else self.root / name

    def object_path(self, repo: str, oid: str) -> Path:
        return self.repo(repo) / "lfs" / "objects" / oid[:2] / oid[2:4] / oid

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self.route()

            def do_POST(self) -> None:
                self.route()

            def route(self) -> None:
                authorised = self.headers.get("Authorization") == f"Bearer {server.token}"
                server.requests.append((self.command, self.path, authorised))
                if not authorised:
                    return self.reply(401, b"", "text/plain", {"WWW-Authenticate": 'Basic realm="hub"'})
                path, _, query = self.path.partition("?")
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if match := BATCH.match(path):
                    return self.batch(match["repo"], json.loads(body))
                if match := OBJECT.match(path):
                    return self.download(server.object_path(match["repo"], match["oid"]))
                if match := GIT.match(path):
                    return self.git(match["repo"], match["rest"], query, body)
                self.reply(404, b"not found", "text/plain")

            def batch(self, repo: str, request: dict) -> None:
                if not server.repo(repo).is_dir():
                    return self.reply(404, b'{"message": "not found"}', "application/vnd.git-lfs+json")
                objects = []
                for obj in request["objects"]:
                    href = f"{server.url}/lfs-objects/{repo}/{obj['oid']}"
                    present = server.object_path(repo, obj["oid"]).is_file()
                    objects.append(
                        {**obj, "actions": {"download": {"href": href}}}
                        if present
                        else {**obj, "error": {"code": 404, "message": "object not found"}}
                    )
                payload = json.dumps({"transfer": "basic", "objects": objects}).encode()
                self.reply(200, payload, "application/vnd.git-lfs+json")

            def download(self, path: Path) -> None:
                data = path.read_bytes()
                if not server.stall_downloads:
                    return self.reply(200, data, "application/octet-stream")
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                server.download_started.set()
                server.release.wait(30)

            def git(self, repo: str, rest: str, query: str, body: bytes) -> None:
                if not server.repo(repo).is_dir():
                    return self.reply(404, b"repository not found", "text/plain")
                env = {
                    "PATH": os.environ["PATH"],
                    "GIT_PROJECT_ROOT": str(server.root),
                    "GIT_HTTP_EXPORT_ALL": "1",
                    "PATH_INFO": f"/{server.repo(repo).relative_to(server.root)}{rest}",
                    "QUERY_STRING": query,
                    "REQUEST_METHOD": self.command,
                    "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                    "CONTENT_LENGTH": str(len(body)),
                    "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
                    "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
                }
                out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
                head, _, payload = out.partition(b"\r\n\r\n")
                headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n") if ": " in line)
                status = int(headers.pop("Status", "200").split()[0])
                self.reply(status, payload, headers.pop("Content-Type", "text/plain"), headers)

            def reply(self, status: int, payload: bytes, ctype: str, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

        return Handler
