"""Running git: the one wrapper of every git call in the library, the workflow and the tools. Prompts are off (a job
must never wait for a password), and a failure raises GitError with git's own words, a secret redacted."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path


class GitError(Exception):
    """A git command failed or git is missing; the message is git's own, with the secret redacted."""


def git(*args: str, cwd: str | Path | None = None, env: Mapping[str, str] | None = None,
        stdin: str | bytes | None = None, binary: bool = False, secret: str | None = None,
        timeout: float | None = None) -> str | bytes:
    """`git ARGS` in `cwd`; its stdout (bytes with binary). `env` replaces the environment (default: this one);
    GIT_TERMINAL_PROMPT=0 is always set."""
    environ = dict(os.environ if env is None else env) | {"GIT_TERMINAL_PROMPT": "0"}
    try:
        result = subprocess.run(["git", *args], cwd=cwd, env=environ, input=stdin, capture_output=True,
                                text=not binary, timeout=timeout)
    except FileNotFoundError:
        raise GitError("git is not installed or not on PATH") from None
    except subprocess.TimeoutExpired:
        raise GitError(f"git {args[0] if args else ''} did not finish within {timeout} s") from None
    if result.returncode != 0:
        said = [out if not binary else out.decode(errors="replace") for out in (result.stderr, result.stdout)]
        text = "\n".join(part.strip() for part in said if part.strip())
        if secret:
            text = text.replace(secret, "***")
        raise GitError(text or f"git {args[0] if args else ''} exited with status {result.returncode}")
    return result.stdout
