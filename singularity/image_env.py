"""The image's Python environment, from requirements.lock: ONE recipe for both images, run INSIDE the image by its
own python3 (no project code, standard library only).

  finetune.def  (%post, Apptainer, CUDA):  python3 image_env.py install --torch-index {{ TORCH_INDEX }}
  the CPU test image (hpc_finetune.container.cpu_image, debootstrap + Charliecloud):
                                           python3 image_env.py install --wheels /mnt/wheels
  both  (%test, and after the CPU build):  /opt/venv/bin/python image_env.py selftest

install  makes the venv /opt/venv and installs the lock into it, hash-checked, with nothing more (--require-hashes
         --no-deps). With --torch-index, torch comes at the lock's version from that index (the CUDA build that
         matches the base image, with the CUDA libraries it needs) and every other entry from the lock; with
         --wheels, every entry from that folder and no network (the wheels `pip download` fetched on the host).
         Then `pip check`, the check below, and the mount points the runtimes bind into (MOUNT_POINTS).
check    fails when an installed package differs from the lock, or one is missing or extra (torch: its version,
         whichever build); writes the installed set to /opt/finetune/installed.json.
selftest imports the stack the stages use and prints the versions; with a GPU visible, a CUDA operation.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

VENV = Path("/opt/venv")
HERE = Path("/opt/finetune")
# Where the runtimes bind host directories. Apptainer creates missing ones itself; Charliecloud (no overlay)
# needs them in the image: /scratch (the caches, run by hand), /mnt/wheels (the CPU build), and the roots under
# which sites keep projects, which the charliecloud runtime covers with a skeleton of the bound paths
# (hpc_finetune.workflow.container).
MOUNT_POINTS = ("/scratch", "/mnt/wheels", "/work", "/home", "/tmp", "/data", "/project", "/projects", "/srv",
                "/gpfs", "/lustre", "/cluster", "/p", "/users", "/root", "/var/tmp")
STACK = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "safetensors",
         "huggingface_hub")
# pip's own packages in a venv: not in the lock, not checked.
VENV_TOOLS = {"pip", "setuptools", "wheel", "pkg-resources"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(lock: Path) -> dict[str, str]:
    """name -> version of every `name==version` entry of the lock."""
    found = (re.match(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)", line) for line in lock.read_text().splitlines())
    return {norm(m.group(1)): m.group(2) for m in found if m}


def without(lock: Path, name: str, out: Path) -> None:
    """The lock without one entry (its line, its --hash lines and its "# via" comments)."""
    entries = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text())
    out.write_text("\n".join(e for e in entries if not e.startswith(f"{name}==")))


def pip(*args: str) -> None:
    subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "--no-cache-dir",
                    *args], check=True)


def install(lock: Path, wheels: str | None, torch_index: str | None) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    source = ["--no-index", "--find-links", wheels] if wheels else []
    if not wheels:
        pip("install", "--upgrade", "pip")
    if torch_index:
        pip("install", *source, "--index-url", torch_index, f"torch=={locked(lock)['torch'].split('+')[0]}")
        rest = HERE / "without-torch.lock"
        without(lock, "torch", rest)
        lock = rest
    pip("install", *source, "--require-hashes", "--no-deps", "-r", str(lock))
    pip("check")
    for point in MOUNT_POINTS:
        Path(point).mkdir(parents=True, exist_ok=True)


def differences(have: dict[str, str], want: dict[str, str]) -> list[str]:
    """What the installed set (name -> version) lacks or has beyond the lock; torch: its version, any build."""
    bad = [f"{n} {have.get(n, 'missing')} != {v}" for n, v in want.items()
           if have.get(n, "").split("+")[0] != v.split("+")[0] or (n != "torch" and have.get(n) != v)]
    bad += [f"{n} {v} is installed but not in the lock" for n, v in have.items()
            if n not in want and n not in VENV_TOOLS]
    return sorted(bad)


def check(lock: Path) -> dict[str, str]:
    """Run by the venv's Python: what is installed equals the lock."""
    from importlib import metadata

    have = {norm(d.metadata["Name"]): d.version for d in metadata.distributions()}
    bad = differences(have, locked(lock))
    if bad:
        raise SystemExit("installed versions differ from requirements.lock: " + "; ".join(bad))
    installed = {n: v for n, v in sorted(have.items()) if n not in VENV_TOOLS}
    (HERE / "installed.json").write_text(json.dumps(installed, indent=1) + "\n")
    return installed


def selftest() -> None:
    import importlib

    mods = {name: importlib.import_module(name) for name in STACK}
    print(" ".join(f"{n} {getattr(m, '__version__', '?')}" for n, m in mods.items()))
    torch = mods["torch"]
    x = torch.ones(8)
    assert float((x * 2).sum()) == 16.0
    if torch.cuda.is_available():
        y = torch.ones(8, device="cuda")
        assert float((y * 2).sum()) == 16.0
        print("CUDA", torch.version.cuda, torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
    else:
        print("no GPU visible: CUDA not checked (run with --nv on a GPU node to check it)")
    print("python", sys.version.split()[0], "prefix", sys.prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["install", "check", "selftest"])
    parser.add_argument("--lock", type=Path, default=HERE / "requirements.lock")
    parser.add_argument("--wheels", help="install from this folder only (no network)")
    parser.add_argument("--torch-index", help="torch (at the lock's version) from this index: the CUDA build")
    args = parser.parse_args()
    if args.command == "install":
        install(args.lock, args.wheels, args.torch_index)
        subprocess.run([str(VENV / "bin" / "python"), __file__, "check", "--lock", str(args.lock)], check=True)
    elif args.command == "check":
        print(f"{len(check(args.lock))} packages installed, equal to {args.lock}")
    else:
        selftest()


if __name__ == "__main__":
    main()
