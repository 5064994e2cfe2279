"""Starting vLLM from our environment: it cannot share ours (it pins its own torch and transformers), so its
interpreter, or an image that has one, runs serve/engine.py in a subprocess with a JSON spec and writes JSON
results. The command is configured (serve_check.python, serve_check.image: workflow/vllm.py builds it); the tests
name `make vllm-env`'s interpreter."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

from hpc_finetune.io.cli import StageError, log

ENGINE_SCRIPT = Path(__file__).resolve().with_name("engine.py")
# what our environment sets that must not leak into vLLM's interpreter; offline: the models are local directories
QUIET = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


class EngineError(StageError):
    """vLLM's process failed before it wrote its results: its own output is in the message."""


def vllm_environ(environ: dict | None = None) -> dict:
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))} | QUIET


def run_engine(command: str | list[str], spec: dict, workdir: Path, log_path: Path | None = None,
               env: dict | None = None) -> dict:
    """serve/engine.py on `spec` with vLLM's interpreter `command` (a path, or `apptainer exec ... img python3`):
    its JSON results. vLLM's output goes to `log_path` (else workdir/vllm.log); `env` is added to its environment;
    a crash raises EngineError with the end of its output."""
    workdir = Path(workdir).absolute()  # the spec's model paths stay relative to our working directory
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out = workdir / "vllm-spec.json", workdir / "vllm-out.json"
    spec_path.write_text(json.dumps(spec))
    out.unlink(missing_ok=True)
    argv = (shlex.split(command) if isinstance(command, str) else list(command)) + [
        str(ENGINE_SCRIPT), str(spec_path), str(out)]
    log_path = log_path or workdir / "vllm.log"
    started = time.time()
    log.info("starting vLLM: %s (its output: %s)", shlex.join(argv[:-3]), log_path)
    with open(log_path, "w") as sink:
        try:
            rc = subprocess.run(argv, env=vllm_environ() | (env or {}), stdout=sink, stderr=subprocess.STDOUT).returncode
        except FileNotFoundError as err:
            raise EngineError(f"vLLM's interpreter {argv[0]} cannot be started ({err}); set serve_check.python to "
                              "vLLM's Python (README, Serving)") from None
    tail = log_path.read_text(errors="replace")[-6000:]
    if not out.is_file():
        raise EngineError(f"vLLM's engine process failed (exit {rc}) before it answered; its output ends:\n{tail}")
    result = json.loads(out.read_text())
    unfinished = [job["name"] for job in spec.get("jobs", []) if job["name"] not in result["jobs"]]
    if rc != 0 or unfinished:
        raise EngineError(f"vLLM's engine process died (exit {rc}) during {', '.join(unfinished) or 'shutdown'}; "
                          f"its output ends:\n{tail}")
    log.info("vLLM %s ran %d job(s) in %.0f s", result["version"], len(result["jobs"]), time.time() - started)
    return result
