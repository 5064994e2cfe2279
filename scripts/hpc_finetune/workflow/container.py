"""The seam between the stages and the container image: whether the runtime is on, what the image is (its
identity, which re-runs the container stage) and where it is, the command prefix that runs a stage inside it
(`apptainer exec --nv --cleanenv --bind ... <sif> `, or Charliecloud's `ch-run ... <squashfs> -- `), the secrets
handed in through the environment, and the workflow's commit for the image's labels. Rules put {IN_IMAGE}
(rules/common.smk) before `python`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path

from hpc_finetune.container.cpu_image import RECIPE
from hpc_finetune.git import GitError, git
from hpc_finetune.workflow.config import ConfigError

REPO_DIR = Path(__file__).resolve().parents[3]

RUNTIME_PROGRAMS = {"charliecloud": "ch-run"}
SECRETS_TO_IMAGE = ("HF_TOKEN", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_TRACKING_TOKEN")  # passed through the environment, never on a command line


def container_on(cfg: dict) -> bool:
    return cfg["container"]["runtime"] != "none"


def check_container(cfg: dict) -> None:
    """Called at parse time when the container is on: a missing runtime or image stops the workflow before any
    job is submitted, with the fix."""
    c = cfg["container"]
    runtime = c["runtime"]
    program = RUNTIME_PROGRAMS.get(runtime, runtime)
    if shutil.which(program) is None:
        raise ConfigError(
            f"config key container.runtime: {program!r} is not on PATH on this machine. Load it "
            f"(`module load {runtime}`) or install it, or set container.runtime=none to run the stages on the host"
        )
    if runtime == "charliecloud" and not os.environ.get("USER"):
        raise ConfigError("config key container.runtime: charliecloud's ch-run needs $USER set (export USER=...)")
    if runtime == "charliecloud":
        check_mount_points(cfg)
    source = c["source"]
    if source == "path":
        if not c["path"]:
            raise ConfigError("config key container.path: required when container.source is path (a .sif file)")
        if not Path(c["path"]).expanduser().is_file():
            raise ConfigError(
                f"config key container.path: image {c['path']} does not exist; build or pull it first, or use "
                "container.source lfs, pull or build (README, Container)"
            )
    elif source == "pull" and not c["url"]:
        raise ConfigError(
            "config key container.url: required when container.source is pull (oras://, docker://, library://, "
            "https://, s3:// or file://)"
        )
    elif source == "lfs" and not c["lfs"]["url"]:
        raise ConfigError("config key container.lfs.url: required when container.source is lfs (the git-lfs repository)")
    elif source == "build" and not Path(container_definition(cfg)).is_file():
        raise ConfigError(f"config key container.definition: {c['definition']} does not exist")


def lfs_pin(cfg: dict) -> str:
    """What the image from the LFS repository is pinned to: a param of the container rule, so that a change
    re-runs it. container.lfs.update false: the configured revision (no network). True: the commit the remote's
    revision names now (git ls-remote), or, when that is the commit the last image came from, the pin recorded
    then, so that asking for an update re-runs nothing unless the remote moved."""
    lfs = cfg["container"]["lfs"]
    if not lfs["update"] or cfg["container"]["source"] != "lfs":
        return lfs["revision"]
    record = Path(container_image(cfg) + ".json")
    previous = json.loads(record.read_text()) if record.is_file() else {}
    try:
        lines, error = git("-c", "credential.helper=", "ls-remote", lfs["url"], lfs["revision"], timeout=60).split(), ""
    except GitError as err:
        lines, error = [], str(err)[-300:]
    if not lines:
        # A job on a node without network re-reads this file: keep the pin the image was made with.
        if previous.get("pin"):
            return previous["pin"]
        if re.fullmatch(r"[0-9a-f]{40}", lfs["revision"]):
            return lfs["revision"]
        raise ConfigError(
            f"config key container.lfs.update: cannot read revision {lfs['revision']!r} of {lfs['url']}: "
            f"{error or 'no such branch or tag'}"
        )
    commit = lines[0]
    if previous.get("commit") == commit and previous.get("pin"):
        return previous["pin"]
    return commit


def container_identity(cfg: dict) -> dict:
    """What the image is, per source (the container rule's params: a change re-runs it). Keys of the other
    sources are left out, so that editing them re-runs nothing."""
    c = cfg["container"]
    source = c["source"]
    what: dict = {"source": source, "sha256": c["sha256"]}
    if source == "path":
        what["path"] = c["path"]
    elif source == "pull":
        what["url"] = c["url"]
    elif source == "lfs":
        lfs = c["lfs"]
        what.update(lfs_url=lfs["url"], lfs_revision=lfs["revision"], lfs_dir=lfs["dir"], lfs_name=lfs["name"])
        what["pin"] = lfs_pin(cfg) if container_on(cfg) else lfs["revision"]
    return what  # build: the def and the requirements are the rule's inputs


def container_image(cfg: dict) -> str:
    """Where the container stage puts the verified image."""
    return cfg["container"]["image"]


def container_scratch(cfg: dict) -> Path:
    """The scratch directory for the image's caches, absolute; `~` and `$VARS` ($USER, $TMPDIR) expanded."""
    return Path(os.path.expandvars(cfg["container"]["scratch_dir"])).expanduser().absolute()


def container_binds(cfg: dict) -> list[str]:
    """Host directories the stages read and write, bound at the same path: the project (working directory:
    config, data, outputs), the workflow's scripts, the outputs, the scratch that holds the caches, the dataset
    and base model when they live elsewhere, and container.binds."""
    c = cfg["container"]
    paths = [Path.cwd(), REPO_DIR, Path(cfg["output_dir"]).absolute(), container_scratch(cfg)]
    dataset = Path(cfg["dataset"]["path"]).expanduser()
    if dataset.exists():
        paths.append((dataset if dataset.is_dir() else dataset.parent).resolve())
    model = cfg["model"]
    if model["source"] == "local" and model.get("path"):
        paths.append(Path(model["path"]).expanduser().resolve())
    if model["source"] == "hub":
        paths.append(Path(model["model_cache_dir"]).expanduser().absolute())
    unique = sorted({str(p) for p in paths})
    nested = {p for p in unique for q in unique if p != q and p.startswith(q.rstrip("/") + "/")}
    return [p for p in unique if p not in nested] + list(c["binds"])


def container_prefix(cfg: dict) -> str:
    """The command prefix of a stage that needs the training stack: '' for runtime none, else
    `<runtime> exec --nv --cleanenv --bind ... --env ... <sif> ` (ending in a space, before `python`). One
    command, no shell statements, so that `exec {IN_IMAGE}python ...` works.

    --cleanenv keeps the host's environment (its Python, PYTHONPATH, conda) out of the image. The hub token goes
    in through the environment (container_environment), never on a command line (argv is visible to every user
    in ps). The caches (HF_HOME, TRITON_CACHE_DIR, XDG_CACHE_HOME) go to the bound scratch: the image is
    read-only. The scratch directory must exist (rules/common.smk creates it)."""
    if cfg["container"]["runtime"] == "none":
        return ""
    if cfg["container"]["runtime"] == "charliecloud":
        return shlex.join(charliecloud_command(cfg)) + " "
    return container_command(cfg, cfg["container"]["runtime"], container_image(cfg))


def container_command(cfg: dict, runtime: str, image: str) -> str:
    """`<runtime> exec [--nv] --cleanenv --bind ... --env ... <image> ` for apptainer or singularity:
    container_prefix for any image (the serve_check stage's vLLM image uses it too)."""
    c = cfg["container"]
    cmd = [runtime, "exec"]
    if c["gpu"]:
        cmd.append("--nv")
    cmd.append("--cleanenv")
    for bind in container_binds(cfg):
        cmd += ["--bind", bind]
    for name, value in image_environment(cfg).items():
        cmd += ["--env", f"{name}={value}"]
    cmd.append(str(Path(image).expanduser().absolute()))
    return shlex.join(cmd) + " "


def image_environment(cfg: dict) -> dict[str, str]:
    """What the stages get inside the image besides the image's own settings: every cache under the scratch bind
    (the image is read-only)."""
    cache = container_scratch(cfg) / "cache"
    return {
        "HF_HOME": str(cache / "huggingface"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "XDG_CACHE_HOME": str(cache),
        "MPLCONFIGDIR": str(cache / "matplotlib"),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONNOUSERSITE": "1",
    }


# Charliecloud (ch-run): no overlay, so a bind's destination must exist in the image. The image has mount points
# for the usual roots (/work, /home, /tmp, /scratch, ...; singularity/image_env.py); each is covered by a host
# directory under the scratch (the skeleton) that holds only the empty directories leading to the bound paths,
# and the paths are bound onto those. Nothing else of the host is visible.
CHENV = "CHENV_"  # host variables handed in are copied to CHENV_<name> first: every other name is unset
PASSED_TO_IMAGE = (*SECRETS_TO_IMAGE, "SLURM_JOB_ID")
IMAGE_PATH = "/opt/venv/bin:/usr/local/bin:/usr/bin:/bin"


def charliecloud_squashfs(cfg: dict) -> Path:
    """The image's root file system as SquashFS (ch-run mounts SquashFS, not SIF): written next to the SIF by
    the container stage."""
    return Path(container_image(cfg) + ".sqfs").absolute()


def unset_all_but(prefix: str) -> list[str]:
    """--unset-env globs (fnmatch) that match every variable name except those starting with prefix."""
    globs = [f"{prefix[:i]}[!{prefix[i]}]*" for i in range(len(prefix))]
    return [f"--unset-env={g}" for g in globs + [prefix[:i] for i in range(1, len(prefix))]]


def charliecloud_binds(cfg: dict) -> list[tuple[str, str]]:
    """(source, destination) of each bound path."""
    return [tuple(b.split(":")[:2]) if ":" in b else (b, b) for b in container_binds(cfg)]


def bind_roots(cfg: dict) -> list[str]:
    """The top-level directories the binds lie under, and /tmp (--private-tmp's skeleton)."""
    return sorted({"/" + Path(dst).parts[1] for _, dst in charliecloud_binds(cfg)} | {"/tmp"})


def charliecloud_mounts(cfg: dict) -> list[tuple[str, str]]:
    """(source, destination) binds: each root's skeleton, then the bound paths at their own path."""
    skeleton = container_scratch(cfg) / "mounts"
    return [(str(skeleton / root.lstrip("/")), root) for root in bind_roots(cfg)] + charliecloud_binds(cfg)


def charliecloud_outputs(cfg: dict) -> list[str]:
    """What the container stage writes for ch-run besides the SIF: its SquashFS (a rule output, so a deleted one
    is made again)."""
    return [str(charliecloud_squashfs(cfg))] if cfg["container"]["runtime"] == "charliecloud" else []


def check_mount_points(cfg: dict) -> None:
    """At parse time: every root a job binds under is a mount point of the SquashFS the container stage made
    (it adds the host's top-level directories; a root made on the host since then is not in it)."""
    record = Path(container_image(cfg) + ".json")
    have = json.loads(record.read_text()).get("mount_points") if record.is_file() else None
    roots = set(bind_roots(cfg))
    if have is not None and roots - set(have):
        raise ConfigError(
            f"container.runtime charliecloud: the image {charliecloud_squashfs(cfg)} has no mount point for "
            f"{', '.join(sorted(roots - set(have)))}, under which this workflow binds paths, and ch-run cannot "
            f"create one in a read-only image. Delete {record} and run again: the container stage adds a mount "
            "point for each top-level directory of the host")


def charliecloud_command(cfg: dict) -> list[str]:
    """`ch-run` with the image read-only, a clean environment (the host's is dropped: only PASSED_TO_IMAGE, the
    caches, PATH, HOME and TMPDIR), the skeleton and the binds, the working directory, then `--`."""
    scratch = container_scratch(cfg)
    env = {"PATH": IMAGE_PATH, "HOME": str(scratch / "home"), "TMPDIR": str(scratch / "tmp"), "LC_ALL": "C.UTF-8",
           **image_environment(cfg)}
    # $NAME is expanded by ch-run from its own environment, in order: the values never are on a command line. A
    # secret not set where the workflow starts is not passed (ch-run would set it empty).
    passed = [name for name in PASSED_TO_IMAGE if name == "SLURM_JOB_ID" or os.environ.get(name)]
    cmd = ["ch-run", *(f"--set-env={CHENV}{name}=${name}" for name in passed), *unset_all_but(CHENV)]
    cmd += [f"--set-env={name}=${CHENV}{name}" for name in passed] + [f"--unset-env={CHENV}*"]
    cmd += [f"--set-env={name}={value}" for name, value in env.items()]
    cmd.append("--private-tmp")  # no host /tmp by default; the /tmp skeleton covers it
    for src, dst in charliecloud_mounts(cfg):
        cmd += ["-b", f"{src}:{dst}"]
    return [*cmd, f"--cd={Path.cwd()}", str(charliecloud_squashfs(cfg)), "--"]


def prepare_scratch(cfg: dict) -> None:
    """At parse time (rules/common.smk), where the jobs run: the scratch's caches, and for Charliecloud the
    skeleton of the bound paths and the home and temporary directories."""
    scratch = container_scratch(cfg)
    for sub in ("cache", "home", "tmp"):
        (scratch / sub).mkdir(parents=True, exist_ok=True)
    if cfg["container"]["runtime"] == "charliecloud":
        for _, dst in charliecloud_mounts(cfg):  # each root, and the directories down to each bound path
            (scratch / "mounts" / dst.lstrip("/")).mkdir(parents=True, exist_ok=True)


def container_environment(cfg: dict, environ: dict) -> dict[str, str]:
    """What the workflow adds to its own environment (inherited by every job) when the container is on: the
    secrets renamed APPTAINERENV_* / SINGULARITYENV_*, which the runtime hands into the image as HF_TOKEN even
    with --cleanenv. So the token reaches the stage without ever being on a command line."""
    runtime = cfg["container"]["runtime"]
    if runtime in ("none", "charliecloud"):  # ch-run copies them itself (charliecloud_command)
        return {}
    env_prefix = "APPTAINERENV_" if runtime == "apptainer" else "SINGULARITYENV_"
    return {env_prefix + name: environ[name] for name in SECRETS_TO_IMAGE if environ.get(name)}


def container_definition(cfg: dict) -> str:
    """The definition file, absolute: relative paths are relative to the workflow's repository."""
    definition = Path(cfg["container"]["definition"]).expanduser()
    return str(definition if definition.is_absolute() else REPO_DIR / definition)


def container_build_inputs(cfg: dict) -> list[str]:
    """What a built image is made of (the container rule's inputs for source build): the definition and the
    recipe it shares with the CPU image (the lock, singularity/image_env.py, singularity/os-packages.txt)."""
    return [container_definition(cfg), *(str(REPO_DIR / name) for name in RECIPE)]


def project_commit() -> str:
    """The workflow's commit, for the image's labels and the manifest; 'unknown' outside a git checkout."""
    try:
        return git("-C", str(REPO_DIR), "rev-parse", "HEAD", timeout=10).strip()
    except GitError:
        return "unknown"
