"""The CPU test image: the recipe of finetune.def (singularity/os-packages.txt, singularity/image_env.py and
requirements.lock) built on a Debian base by maintained tools, for a real container runtime where Apptainer is not
available (Charliecloud; README, "Container"):

  1. the lock's wheels, downloaded on the host (`pip download --require-hashes --no-deps`: the host's pip settings
     and wheel folders, torch's CPU build included);
  2. a Debian bookworm root file system (debootstrap --variant=minbase) with the OS packages not marked `cuda`;
  3. the venv inside it, made by the image's own python3 running image_env.py under `ch-run -w` with the wheels
     bound in and no network use (--no-index), checked against the lock, then the %test-style self check;
  4. SquashFS (mksquashfs), wrapped into a SIF with Debian's siftool (a real SIF with one file system partition).

The build is cached by the hash of what it is made of (the lock, the recipe files, BUILDER_VERSION) under
$HPC_FINETUNE_IMAGE_CACHE (default ~/.cache/hpc-finetune/images)/<hash>/: built once, shared by every test and CI
job on the machine; concurrent builders wait for one another (a file lock).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hpc_finetune.io.cli import StageError, log, table
from hpc_finetune.io.files import sha256_file

REPO_DIR = Path(__file__).resolve().parents[3]
RECIPE = ("requirements.lock", "singularity/image_env.py", "singularity/os-packages.txt")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
TOOLS = {"debootstrap": "debootstrap", "ch-run": "charliecloud-runtime", "mksquashfs": "squashfs-tools",
         "siftool": "siftool"}
BUILDER_VERSION = 1  # raise it when a change of build() changes what the image holds
BUILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def cache_root() -> Path:
    return Path(os.environ.get("HPC_FINETUNE_IMAGE_CACHE") or Path.home() / ".cache" / "hpc-finetune" / "images")


def recipe_hash(repo: Path = REPO_DIR) -> str:
    """What the image is made of: the recipe files and the builder's version (a change makes a new image)."""
    digest = hashlib.sha256(f"builder {BUILDER_VERSION} {SUITE}".encode())
    for name in RECIPE:
        digest.update(name.encode() + b"\0" + (repo / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def os_packages(repo: Path = REPO_DIR, cuda: bool = False) -> list[str]:
    lines = [line.split() for line in (repo / "singularity" / "os-packages.txt").read_text().splitlines()]
    return [w[0] for w in lines if w and not w[0].startswith("#") and (cuda or w[1:2] != ["cuda"])]


def run(cmd: list[str], what: str, **kwargs) -> None:
    log.info("$ %s", shlex.join(cmd))
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise StageError(f"{what} failed (exit {result.returncode}): {(result.stderr or result.stdout)[-2000:]}")
    log.info("%s: %.0f s", what, time.monotonic() - started)


def ch_run(rootfs: Path, *cmd: str, binds: tuple[str, ...] = (), write: bool = False) -> list[str]:
    """ch-run in the image with a clean environment (nothing of the host's, pip's settings included)."""
    args = ["ch-run", "--unset-env=*", f"--set-env=PATH={BUILD_PATH}", "--set-env=LC_ALL=C.UTF-8"]
    args += ["-w"] if write else []
    for bind in binds:
        args += ["-b", bind]
    return [*args, str(rootfs), "--", *cmd]


def check_tools() -> None:
    missing = [f"{tool} (apt-get install {package})" for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise StageError("building the CPU image needs " + ", ".join(missing))


def download_wheels(repo: Path, dest: Path) -> None:
    """The lock's wheels, hash-checked by pip, into dest (kept per lock: a recipe change reuses them)."""
    if (dest / ".complete").is_file():
        return
    dest.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
         "-r", str(repo / "requirements.lock"), "-d", str(dest)],
        "pip download of the lock's wheels (an sdist where a package has none)")
    (dest / ".complete").touch()


def build(repo: Path = REPO_DIR, root: Path | None = None) -> dict:
    """The image for this recipe, from the cache or built now; returns its record (paths, sizes, timings)."""
    root = root or cache_root()
    key = recipe_hash(repo)
    out = root / key
    record_path = out / "image.json"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if record_path.is_file():
            return json.loads(record_path.read_text())
        check_tools()
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        times: dict[str, float] = {}
        lock_hash = sha256_file(repo / "requirements.lock")[:16]
        wheels = root / f"wheels-{lock_hash}"
        t = time.monotonic()
        download_wheels(repo, wheels)
        times["wheels_s"] = time.monotonic() - t
        rootfs = out / "rootfs"
        t = time.monotonic()
        run(["debootstrap", "--variant=minbase", f"--include={','.join(os_packages(repo))}", SUITE, str(rootfs),
             os.environ.get("HPC_FINETUNE_DEBIAN_MIRROR", MIRROR)], "debootstrap")
        times["debootstrap_s"] = time.monotonic() - t
        t = time.monotonic()
        here = rootfs / "opt" / "finetune"
        here.mkdir(parents=True)
        for name in RECIPE:
            shutil.copy(repo / name, here / Path(name).name)
        (rootfs / "mnt" / "wheels").mkdir(parents=True, exist_ok=True)
        env = {"USER": os.environ.get("USER") or "root", "PATH": os.environ["PATH"]}
        run(ch_run(rootfs, "python3", "/opt/finetune/image_env.py", "install", "--wheels", "/mnt/wheels",
                   binds=(f"{wheels}:/mnt/wheels",), write=True), "the venv from the lock (image_env.py install)",
            env=env)
        times["venv_s"] = time.monotonic() - t
        selftest = subprocess.run(ch_run(rootfs, "/opt/venv/bin/python", "/opt/finetune/image_env.py", "selftest"),
                                  capture_output=True, text=True, env=env)
        if selftest.returncode != 0:
            raise StageError(f"the image's self check failed: {selftest.stderr[-2000:]}")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        t = time.monotonic()
        squashfs = out / "finetune.sqfs"
        run(["mksquashfs", str(rootfs), str(squashfs), "-comp", "zstd", "-Xcompression-level", "3", "-noappend",
             "-quiet", "-no-progress"],  # level 3: 70 s, level 15 (the default): 1261 s (README, Container)
            "mksquashfs")
        sif = out / "finetune.sif"
        run(["siftool", "new", str(sif)], "siftool new")
        # a system partition (parttype 2) holding SquashFS (partfs 1) for amd64 (partarch 2): as Apptainer writes it
        run(["siftool", "add", "--datatype", "4", "--parttype", "2", "--partfs", "1", "--partarch", "2", str(sif),
             str(squashfs)], "siftool add")
        times["pack_s"] = time.monotonic() - t
        installed = json.loads((here / "installed.json").read_text())
        shutil.rmtree(rootfs)
        squashfs.unlink()
        record = {"key": key, "sif": str(sif), "sha256": sha256_file(sif), "size": sif.stat().st_size,
                  "installed": installed, "selftest": selftest.stdout.strip(),
                  **{k: round(v, 1) for k, v in times.items()}}
        record_path.write_text(json.dumps(record, indent=1) + "\n")
        log.info("%s", table([(k, v) for k, v in record.items() if k != "installed"], "CPU image"))
        return record
