"""A STAND-IN for the `apptainer` / `singularity` command, for tests only. Apptainer cannot be installed on the
test machines, so this program takes its place on PATH: it records its arguments, working directory and the
APPTAINERENV_* / SINGULARITYENV_* variables it received (one JSON line per call to $STANDIN_LOG), and then

  exec   checks the image is a SIF file and every --bind source exists (as the runtime would), and runs the inner
         command ON THE HOST with the environment the runtime would give it (--cleanenv: only PATH, HOME, LANG
         and TMPDIR of the host, the *ENV_ variables renamed, the --env values). No container runs;
  pull   writes a real SIF made by Debian's siftool to the destination;
  build  fails the modes not listed in $STANDIN_BUILD_ALLOW (fakeroot, unprivileged) like a site that forbids
         them, otherwise writes a real SIF made by siftool.

Nothing here proves anything about a real container; it proves the command lines and environment the
workflow gives the runtime, and that the stages run with them.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = {"--nv", "--cleanenv", "-e", "--contain", "-c", "--writable-tmpfs", "--no-home", "--fakeroot", "--force",
         "-F", "--nvccli", "--rocm"}
VALUED = {"--bind", "-B", "--env", "--pwd", "--home", "--env-file", "--overlay", "--build-arg", "--mount"}


def install(bindir: Path, name: str = "apptainer") -> Path:
    """Write the stand-in as an executable `name` in bindir (put bindir first on PATH)."""
    bindir.mkdir(parents=True, exist_ok=True)
    exe = bindir / name
    exe.write_text(f"#!{sys.executable}\n# STAND-IN for {name} (tests only): see tests/support/container_standin.py\n"
                   f"import runpy, sys; runpy.run_path({str(Path(__file__))!r})['main'](sys.argv)\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


def records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def make_sif(path: Path, payload: bytes = b"stand-in root file system\n" * 2000) -> Path:
    """A real SIF file (siftool) with one squashfs-typed partition holding payload."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with tempfile.NamedTemporaryFile(suffix=".img") as part:
        part.write(payload)
        part.flush()
        subprocess.run(["siftool", "new", str(path)], check=True, capture_output=True)
        subprocess.run(["siftool", "add", "--datatype", "4", "--parttype", "2", "--partfs", "1", "--partarch", "2",
                        str(path), part.name], check=True, capture_output=True)
    return path


def parse(args: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    opts: dict[str, list[str]] = {}
    i = 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] in VALUED:
            opts.setdefault(args[i], []).append(args[i + 1])
            i += 2
        else:
            opts.setdefault(args[i], []).append("")
            i += 1
    return opts, args[i:]


def fatal(msg: str) -> None:
    print(f"FATAL:   {msg} [stand-in]", file=sys.stderr)
    sys.exit(255)


def main(argv: list[str]) -> None:
    name, args = Path(argv[0]).name, argv[1:]
    envp = "APPTAINERENV_" if name == "apptainer" else "SINGULARITYENV_"
    log = os.environ.get("STANDIN_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"runtime": name, "argv": args, "cwd": os.getcwd(),
                                 "env": {k: v for k, v in os.environ.items() if k.startswith(envp)}}) + "\n")
    if not args or args[0] in ("--version", "version"):
        print(f"{name} version 0.0.0-stand-in (not a container runtime)")
        return
    command, (opts, rest) = args[0], parse(args[1:])
    if command == "exec":
        sif, inner = Path(rest[0]), rest[1:]
        with open(sif, "rb") as fh:
            if fh.read(42)[32:42] != b"SIF_MAGIC\0":
                fatal(f"could not open image {sif}: not a SIF")
        for bind in opts.get("--bind", []) + opts.get("-B", []):
            for spec in bind.split(","):
                if not Path(spec.split(":")[0]).exists():
                    fatal(f"container creation failed: mount {spec}: no such file or directory")
        if "--cleanenv" in opts:
            env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
        else:
            env = dict(os.environ)
        env.update({k[len(envp):]: v for k, v in os.environ.items() if k.startswith(envp)})
        for pair in opts.get("--env", []):
            key, _, value = pair.partition("=")
            env[key] = value
        os.execvpe(inner[0], inner, env)
    if command == "pull":
        make_sif(Path(rest[0]))
        return
    if command == "build":
        allowed = os.environ.get("STANDIN_BUILD_ALLOW", "").split(",")
        mode = "fakeroot" if "--fakeroot" in opts else "unprivileged"
        if mode not in allowed:
            fatal(f"{mode} build not allowed at this (stand-in) site")
        if not Path(rest[1]).is_file():
            fatal(f"definition {rest[1]} not found")
        make_sif(Path(rest[0]))
        return
    fatal(f"stand-in does not implement {command!r}")
