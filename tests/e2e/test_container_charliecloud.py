"""Stages that really run in a container: the CPU image built from the lock by debootstrap (cached by the recipe's
hash: hpc_finetune.container.cpu_image), the container stage's build source with runtime charliecloud, and the
short demo's data, train, merge and evaluate stages run by Charliecloud's ch-run through profiles/local. Checked
from inside, with the very prefix the stages ran under: the image's Python and packages, nothing of the host
outside the binds, nothing of the host's environment but the token; and the metrics equal the host run's
(the stand-in run of the same short demo, `container_demo`)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hpc_finetune.container import sif as sif_check
from hpc_finetune.workflow import container as workflow_container
from hpc_finetune.workflow.config import ConfigError, resolve_config
from support.common import REPO, SNAKEMAKE
from support.container import CONTAINER_DEMO, DEF, SECRET, project, sections, snakemake
from tools import lock

IN_IMAGE_STAGES = {"build_demo_model", "prepare_data", "preflight", "train", "merge", "evaluate"}
CHARLIECLOUD = ["container__runtime=charliecloud", "container__source=build", *CONTAINER_DEMO]
# Run inside the image with the stages' prefix: what it is and what it sees, as JSON (no secret values).
PROBE = """
import json, os, sys
from importlib import metadata
print(json.dumps({
    "prefix": sys.prefix, "executable": sys.executable, "version": sys.version.split()[0],
    "installed": {d.metadata["Name"]: d.version for d in metadata.distributions()},
    "torch_file": __import__("torch").__file__, "environ": sorted(os.environ),
    "token_ok": os.environ.get("HF_TOKEN") == sys.argv[1], "cwd": os.getcwd(),
    "seen": {p: sorted(os.listdir(p)) if os.path.isdir(p) else os.path.exists(p) for p in sys.argv[2:]},
    "writable_cache": os.access(os.environ["HF_HOME"].rsplit("/", 1)[0], os.W_OK),
    "os": open("/etc/os-release").read().split("PRETTY_NAME=")[1].split(chr(10))[0],
}))
"""


@pytest.fixture(scope="module")
def ch_demo(cpu_image, tmp_path_factory):
    """The short demo with runtime charliecloud."""
    root = tmp_path_factory.mktemp("charliecloud-demo")
    workdir = project(root)
    outside = root / "outside-the-binds.txt"
    outside.write_text("a host file no bind covers\n")
    env = {"USER": os.environ.get("USER") or "root", "LEAK_CANARY": "host-only"}
    started = time.monotonic()
    result = snakemake(workdir, "--config", *CHARLIECLOUD, env=env)
    wall = time.monotonic() - started
    with pytest.MonkeyPatch.context() as mp:  # the prefix as the workflow made it: in the project, token set
        mp.chdir(workdir)
        mp.setenv("HF_TOKEN", SECRET)
        cfg = resolve_config({"run_name": "demo", **dict(c.split("=", 1) for c in CHARLIECLOUD)})
        prefix = workflow_container.container_prefix(cfg)
    assert f"{prefix}python " in result.stdout + result.stderr  # the very prefix the stages ran under
    looks = [str(outside), str(root), str(REPO.parent), str(workdir / "config.yaml")]
    probe = subprocess.run([*shlex.split(prefix), "python", "-c", PROBE, SECRET, *looks],
                           cwd=workdir, capture_output=True, text=True,
                           env=os.environ | env | {"HF_TOKEN": SECRET})
    assert probe.returncode == 0, probe.stderr[-3000:]
    return {"workdir": workdir, "result": result, "prefix": prefix, "wall_s": wall, "outside": outside,
            "inside": json.loads(probe.stdout.splitlines()[-1]), "image": cpu_image}


def test_the_def_and_the_cpu_image_share_one_recipe():
    """finetune.def copies the recipe files into the image and runs them; no package list or version in the def."""
    sec = sections(DEF.read_text())
    files = [line.split() for line in sec["files"].splitlines() if line.strip()]
    for name in ("requirements.lock", "singularity/image_env.py", "singularity/os-packages.txt"):
        assert [name, f"/opt/finetune/{Path(name).name}"] in files, name
    assert "python3 /opt/finetune/image_env.py install --torch-index {{ TORCH_INDEX }}" in sec["post"]
    assert "/opt/finetune/os-packages.txt" in sec["post"] and "python3-venv" not in sec["post"]
    assert "/opt/venv/bin/python /opt/finetune/image_env.py selftest" in sec["test"]


def test_a_missing_ch_run_or_user_stops_the_workflow_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config({"run_name": "demo", "container__runtime": "charliecloud", "container__source": "build"})
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match=r"'ch-run' is not on PATH .*module load charliecloud"):
        workflow_container.check_container(cfg)
    (tmp_path / "ch-run").write_text("#!/bin/sh\n")
    (tmp_path / "ch-run").chmod(0o755)
    monkeypatch.delenv("USER", raising=False)
    with pytest.raises(ConfigError, match=r"ch-run needs \$USER set"):
        workflow_container.check_container(cfg)


def test_a_bound_root_the_image_has_no_mount_point_for_stops_the_workflow_with_the_fix(tmp_path, monkeypatch):
    """The container stage records the SquashFS's top-level directories; a job binding under another root would
    fail in ch-run ("can't mkdir ... Read-only file system"), so the workflow stops at parse time instead."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("USER", os.environ.get("USER") or "root")
    cfg = resolve_config({"run_name": "demo", "container__runtime": "charliecloud", "container__source": "build"})
    record = Path(workflow_container.container_image(cfg) + ".json")
    record.parent.mkdir(parents=True)
    assert workflow_container.charliecloud_outputs(cfg) == [str(workflow_container.charliecloud_squashfs(cfg))]
    roots = workflow_container.bind_roots(cfg)
    record.write_text(json.dumps({"mount_points": [*roots, "/etc"]}))
    workflow_container.check_mount_points(cfg)
    record.write_text(json.dumps({"mount_points": ["/etc", "/tmp"]}))
    missing = next(r for r in roots if r != "/tmp")
    with pytest.raises(ConfigError, match=rf"no mount point for .*{missing}.*Delete {record}"):
        workflow_container.check_mount_points(cfg)


def test_the_cpu_image_is_a_real_sif_with_a_squashfs_holding_exactly_the_lock(ch_demo):
    image = ch_demo["image"]
    offset, size = sif_check.partition(image["sif"])
    listed = subprocess.run(["siftool", "list", image["sif"]], capture_output=True, text=True, check=True).stdout
    assert "FS" in listed and "Squashfs" in listed, listed
    with open(image["sif"], "rb") as fh:
        fh.seek(offset)
        assert fh.read(4) == b"hsqs" and offset + size <= os.path.getsize(image["sif"])
    inside = {lock.canonical(name): v for name, v in ch_demo["inside"]["installed"].items()}
    assert inside == {lock.canonical(name): v for name, v in lock.locked().items()}


def test_the_stages_ran_in_the_images_python(ch_demo):
    inside, workdir = ch_demo["inside"], ch_demo["workdir"]
    assert inside["prefix"] == "/opt/venv" and inside["executable"].startswith("/opt/venv/bin/")
    assert inside["torch_file"].startswith("/opt/venv/lib/python3.11/site-packages/torch/")
    assert "bookworm" in inside["os"] and inside["cwd"] == str(workdir)
    shell = (ch_demo["result"].stdout + ch_demo["result"].stderr).splitlines()  # printshellcmds: what ran
    squashfs = str(workdir / "resources" / "container" / "finetune.sif.sqfs")
    ran = {stage for stage in IN_IMAGE_STAGES for line in shell
           if f"{REPO}/scripts/{stage}.py" in line and "ch-run " in line and f"{squashfs} -- " in line}
    assert ran == IN_IMAGE_STAGES, "\n".join(shell[-60:])
    record = json.loads((workdir / "resources" / "container" / "finetune.sif.json").read_text())
    assert record["build_mode"] == "debootstrap+ch-run" and record["sha256"] == ch_demo["image"]["sha256"]
    assert (workdir / record["squashfs"]).is_file()


def test_only_the_binds_and_the_token_reach_the_image(ch_demo):
    inside = ch_demo["inside"]
    seen, workdir = inside["seen"], ch_demo["workdir"]
    assert seen[str(workdir / "config.yaml")] is True  # the project is bound ...
    assert seen[str(ch_demo["outside"])] is False  # ... a host file beside it is not
    assert seen[str(workdir.parent)] == ["project"] and seen[str(REPO.parent)] == [REPO.name]  # only the binds
    assert inside["token_ok"] and "LEAK_CANARY" not in inside["environ"]
    assert not [v for v in inside["environ"] if v.startswith(("CHENV_", "PIP_", "VIRTUAL_ENV", "CONDA"))]
    assert inside["writable_cache"]
    assert SECRET not in ch_demo["prefix"] and SECRET not in ch_demo["result"].stdout + ch_demo["result"].stderr
    leaks = [str(p) for p in ch_demo["workdir"].rglob("*") if p.is_file() and not p.is_symlink()
             and SECRET.encode() in p.read_bytes()]
    assert leaks == []


def losses(run: Path) -> dict:
    train = json.loads((run / "metrics" / "train.json").read_text())
    evaluate = json.loads((run / "metrics" / "evaluate.json").read_text())
    return {**{f"train.{k}": v for k, v in train.items() if "loss" in k and isinstance(v, float)},
            **{f"evaluate.{k}": v for k, v in evaluate.items() if "loss" in k and isinstance(v, float)}}


def test_the_metrics_equal_the_host_runs(container_demo, ch_demo):
    inside = losses(ch_demo["workdir"] / "results" / "demo")
    host = losses(container_demo["workdir"] / "results" / "demo")
    assert inside and inside.keys() == host.keys()
    assert inside == pytest.approx(host, rel=1e-5)
    print(f"\nshort demo wall time: in the container {ch_demo['wall_s']:.0f} s (image cached), "
          f"on the host through the stand-in {container_demo['wall_s']:.0f} s")


def test_stages_run_in_the_container_as_jobs_of_the_real_slurm_cluster(cpu_image, cluster, tmp_path):
    """A fresh project through profiles/slurm up to the data: the demo model's build and prepare_data are Slurm
    jobs that run ch-run on the node (the container stage is a local rule: it links the cached image). Run under
    `flock /work/slurm.lock`."""
    workdir = project(tmp_path)
    cmd = [*SNAKEMAKE, "--profile", str(REPO / "profiles" / "slurm"), "--slurm-status-command", "squeue",
           "--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "3",
           "--until", "prepare_data", "--config", *CHARLIECLOUD]
    env = os.environ | {"USER": os.environ.get("USER") or "root", "HF_TOKEN": SECRET,
                        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["timeout", "1200", *cmd], cwd=workdir, env=env, capture_output=True, text=True)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-6000:]
    jobs = dict((rule, Path(log)) for log, rule in re.findall(
        r"submitted with SLURM jobid \d+ \(log: (\S+/rule_(\w+)/(?:\S+/)?\d+\.log)\)", text))
    assert {"build_demo_model", "prepare_data"} <= jobs.keys(), text[-4000:]
    for rule in ("build_demo_model", "prepare_data"):
        log = jobs[rule] if jobs[rule].is_absolute() else workdir / jobs[rule]
        ran = log.read_text()  # the job's own Snakemake: the rule's resources (in_image) or its shell command
        assert "ch-run" in ran and "finetune.sif.sqfs" in ran, (rule, ran[-3000:])
    assert (workdir / "results" / "demo" / "data" / "train.jsonl").stat().st_size > 0
