"""The wheels the GPU check carries to a GPU machine that has no network (`make gpu-bundle`): what its image lacks
of the pinned stack (trl, bitsandbytes, datasets, liger-kernel, and transformers, peft, huggingface-hub and
tokenizers at our pins rather than the image's older ones) and Snakemake with what it needs, for CPython 3.12 on
manylinux x86_64; how they are installed there (into a folder put first on PYTHONPATH); and the check that the
working tree and the bundle together stay under what the device tool carries (64 MiB).

The device image (its package list: torch 2.11 CUDA 13, accelerate, safetensors, numpy, pandas, pyarrow, jinja2,
psutil, pyyaml, requests, ... but no trl, bitsandbytes, datasets, liger-kernel, snakemake, jsonschema) decides
what is bundled; every bundled package is at the lock's version (requirements.lock), and pip checks each file
against the lock's hashes. Left out on purpose: torch (the image's CUDA build is the one that matters), pulp
(16 MB; Snakemake imports it only for its ILP scheduler and falls back to the greedy one without it).

bitsandbytes' wheel (43 MB) holds a library for every CUDA and ROCm release (129 MB unpacked); the bundle keeps
its CPU library and those for CUDA 13 (the image's torch is +cu130) and rewrites the wheel's RECORD to match, so
the bundle stays near 30 MB.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from hpc_finetune.io.cli import log
from tools import lock

REPO = Path(__file__).resolve().parents[3]
CARRY_LIMIT = 64 * 2**20  # the device tool carries at most this much: working tree + carried paths
BUNDLE_DIR = ".gpu-bundle"
BUNDLE_BUDGET = 45 * 2**20  # measured 37.3 MiB (2026-12); the tree must leave this much of CARRY_LIMIT
# What the image lacks of the stack or has at other versions, and what those need that the image does not have (or
# may have at a version outside their ranges): names only, every version from the lock (requirements.lock), so the
# GPU machine runs what the tests ran; each downloaded wheel is checked against the lock's hashes.
BUNDLED = (
    "trl", "bitsandbytes", "datasets", "transformers", "peft", "huggingface-hub", "tokenizers", "snakemake",
    "jsonschema",
    # datasets, huggingface-hub
    "dill", "multiprocess", "fsspec", "httpx2", "httpcore2", "truststore", "anyio", "idna", "h11",
    # snakemake
    "packaging", "platformdirs", "immutables", "configargparse", "connection-pool", "docutils", "gitpython", "gitdb",
    "smmap", "humanfriendly", "nbformat", "fastjsonschema", "jupyter-core", "traitlets", "referencing",
    "jsonschema-specifications", "rpds-py", "tenacity", "smart-open", "snakemake-interface-executor-plugins",
    "snakemake-interface-common", "snakemake-interface-storage-plugins", "snakemake-interface-report-plugins",
    "snakemake-interface-logger-plugins", "snakemake-interface-scheduler-plugins", "argparse-dataclass", "throttler",
    "yte", "dpath", "conda-inject", "sqlmodel", "sqlalchemy", "greenlet", "pydantic", "pydantic-core",
    "annotated-types", "typing-inspection",
)
# Not in the lock (not in the CPU stack: it needs triton): NOTES.md's measured version, unhashed.
EXTRA = ("liger-kernel==0.8.5",)
# Needs of bundled packages that are left out on purpose, not reported as unmet.
LEFT_OUT = {"pulp": "Snakemake imports it only for its ILP scheduler and runs the greedy one without it (16 MB)"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64")
PYTHON = "3.12"
BNB_KEEP = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")  # the image's torch is +cu130
# Imported on the GPU machine after the install, to prove the bundle works there (module names).
MODULES = ("trl", "bitsandbytes", "datasets", "liger_kernel", "transformers", "peft", "huggingface_hub", "snakemake",
           "jsonschema")


def pins() -> dict[str, str]:
    """The lock's name -> version (canonical names)."""
    return lock.locked()


def requirements() -> list[str]:
    """Every `name==version` the bundle holds."""
    pinned = pins()
    missing = [name for name in BUNDLED if name not in pinned]
    if missing:
        raise SystemExit(f"no entry for {', '.join(missing)} in {lock.LOCK.name}: add them to the *.in files, make lock")
    return [f"{name}=={pinned[name]}" for name in BUNDLED] + list(EXTRA)


def hashed(requirement: str, folder: Path) -> list[str]:
    """pip's arguments for one requirement: a requirements file holding it with the lock's hashes, so that pip
    itself refuses a file the lock does not allow (the wheel, or the source a wheel is built from); EXTRA's as is."""
    name = lock.canonical(requirement.split("==")[0])
    allowed = lock.hashes().get(name)
    if not allowed:
        return [requirement]
    spec = folder / f".{name}.req"
    spec.write_text(requirement + "".join(f" --hash=sha256:{digest}" for digest in allowed) + "\n")
    return ["--require-hashes", "-r", str(spec)]


def build(folder: Path, python: str = PYTHON) -> dict:
    """Download the wheels for CPython `python` into `folder` (a wheel already there is kept), slim bitsandbytes,
    and write bundle.json (what is in it, sizes). A package published only as source is built into a wheel here,
    if pure. Another `python` than the GPU machine's makes a bundle to rehearse the install with here."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = requirements()
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    for requirement in wanted:
        if wheel_for(folder, requirement):
            continue
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--python-version", python, "--implementation", "cp", *platform_args,
               "-d", str(folder), *hashed(requirement, folder)]
        if subprocess.run(cmd).returncode != 0:
            log.info("%s has no wheel for CPython %s; building one here (pure Python only)", requirement, python)
            cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
                   "-w", str(folder), *hashed(requirement, folder)]
            if subprocess.run(cmd).returncode != 0:
                raise SystemExit(f"could not get a wheel of {requirement}")
        wheel = wheel_for(folder, requirement)
        if wheel is None or (not wheel.name.endswith("-none-any.whl") and "manylinux" not in wheel.name):
            raise SystemExit(f"{requirement}: no wheel for CPython {python} on manylinux x86_64 in {folder}")
    stray = sorted({p.name for p in folder.glob("*.whl")} - {wheel_for(folder, r).name for r in wanted})
    for name in stray:  # an older pin's wheel: two versions of one package stop the whole install
        (folder / name).unlink()
    for spec in folder.glob(".*.req"):
        spec.unlink()
    slim_bitsandbytes(next(folder.glob("bitsandbytes-*.whl")))
    wheels = sorted(folder.glob("*.whl"))
    report = {"python": python, "platforms": list(PLATFORMS), "requirements": wanted,
              "wheels": {p.name: p.stat().st_size for p in wheels}, "bytes": sum(p.stat().st_size for p in wheels)}
    (folder / "bundle.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def wheel_for(folder: Path, requirement: str) -> Path | None:
    name, version = requirement.split("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()
    for path in folder.glob("*.whl"):
        parts = path.name.split("-")
        if re.sub(r"[-_.]+", "_", parts[0]).lower() == stem and parts[1] == version:
            return path
    return None


def slim_bitsandbytes(wheel: Path) -> None:
    """Drop the libraries for other CUDA/ROCm/XPU releases from the bitsandbytes wheel (in place) and rewrite its
    RECORD to list what is left. Idempotent."""
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        drop = {n for n in names if n.endswith(".so") and "libbitsandbytes_" in n and not BNB_KEEP.search(n)}
        if not drop:
            return
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if info.filename in drop:
                    continue
                data = src.read(info.filename)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = [line for line in data.decode().splitlines() if line.split(",")[0] not in drop]
                    data = ("\n".join(lines) + "\n").encode()
                dst.writestr(info, data)
    os.replace(tmp, wheel)
    log.info("bitsandbytes: kept %s; dropped %d libraries for other releases",
             ", ".join(sorted(n.rsplit("/", 1)[-1] for n in names if BNB_KEEP.search(n))), len(drop))


def install(folder: Path, site: Path, timeout: float | None = None) -> dict:
    """Install the bundle's wheels into `site` (no index, no deps: everything is in the bundle or the image).
    Returns what was installed and how long it took; raises SystemExit with pip's output when it fails."""
    import time

    wheels = sorted(str(p) for p in folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheels in {folder}: run `make gpu-bundle` on the machine that sends the tree")
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "--upgrade", "--target", str(site), *wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"installing the bundle failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"site": str(site), "wheels": len(wheels), "install_s": round(time.perf_counter() - start, 1)}


def unmet_requirements(names: list[str]) -> list[str]:
    """The requirements of these installed distributions that the environment does not meet (as pip check would
    say), e.g. a package of the image older than a bundled package needs; LEFT_OUT's are not counted."""
    from importlib import metadata

    from packaging.requirements import Requirement

    unmet = []
    for name in names:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            unmet.append(f"{name}: not installed")
            continue
        for text in dist.requires or []:
            req = Requirement(text)
            if (req.marker and not req.marker.evaluate({"extra": ""})) or lock.canonical(req.name) in LEFT_OUT:
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                unmet.append(f"{name} needs {req}: missing")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{name} needs {req}: have {have}")
    return unmet


def tree_bytes(repo: Path = REPO) -> int:
    """Bytes of what the device tool sends: tracked files and untracked files that git does not ignore."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    return sum((repo / name).stat().st_size for name in out.decode().split("\0")
               if name and (repo / name).is_file() and not (repo / name).is_symlink())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def carried(repo: Path = REPO, bundle: Path | None = None) -> dict:
    """What one `run` call carries (tree + bundle), against the 64 MiB limit."""
    bundle = bundle or repo / BUNDLE_DIR
    tree, wheels = tree_bytes(repo), folder_bytes(bundle)
    return {"tree_bytes": tree, "bundle_bytes": wheels, "total_bytes": tree + wheels, "limit_bytes": CARRY_LIMIT,
            "fits": tree + wheels <= CARRY_LIMIT}
