"""The container seam through the workflow: checks at parse time, the demo with every stack stage run through the
stand-in runtime (nv, cleanenv, binds, the token only in the environment; the `container_demo` fixture in
conftest.py), what a new image re-runs, and the lfs and build sources as the workflow drives them."""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest
from hpc_finetune.workflow import container as workflow_container
from hpc_finetune.workflow.config import ConfigError, resolve_config
from support import container_standin
from support.common import REPO
from support.container import DEF, SECRET, git, project, snakemake
from support.workflow import planned_jobs

# --- the workflow: checks at parse time, the demo through the stand-in, what a new image re-runs -----------------

def test_a_missing_runtime_or_image_stops_the_workflow_before_any_job(sif, tmp_path, monkeypatch):
    workdir = project(tmp_path)
    no_runtime = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    result = snakemake(workdir, "--dry-run", "--config", "container__runtime=apptainer", path=no_runtime,
                       check=False)
    assert result.returncode != 0
    assert "'apptainer' is not on PATH" in result.stderr and "module load apptainer" in result.stderr
    cfg = resolve_config({"run_name": "demo", "container": {
        "runtime": "singularity", "source": "path", "path": str(tmp_path / "nope.sif")}})
    container_standin.install(tmp_path / "bin", "singularity")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    with pytest.raises(ConfigError, match="image .*nope.sif does not exist"):
        workflow_container.check_container(cfg)
    cfg["container"].update(source="lfs")
    with pytest.raises(ConfigError, match="container.lfs.url: required"):
        workflow_container.check_container(cfg)
    assert not (workdir / "results").exists()


def test_the_seam_is_empty_for_runtime_none_and_one_command_otherwise(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config({"run_name": "demo"})
    assert workflow_container.container_prefix(cfg) == "" and workflow_container.container_environment(cfg, {"HF_TOKEN": "x"}) == {}
    cfg = resolve_config({"run_name": "demo", "container__runtime": "singularity", "container__gpu": "false"})
    prefix = workflow_container.container_prefix(cfg)
    assert prefix.startswith("singularity exec --cleanenv --bind ") and "--nv" not in prefix
    assert ";" not in prefix and "&&" not in prefix  # `exec {prefix}python ...` must stay one command
    assert workflow_container.container_environment(cfg, {"HF_TOKEN": "t"}) == {"SINGULARITYENV_HF_TOKEN": "t"}
    monkeypatch.setenv("HF_TOKEN", "hf_secretValue")
    cfg = resolve_config({"run_name": "demo", "container__runtime": "charliecloud"})
    args = shlex.split(workflow_container.container_prefix(cfg))
    assert args[0] == "ch-run" and args[-2:] == [str(tmp_path / "resources/container/finetune.sif.sqfs"), "--"]
    assert "--set-env=CHENV_HF_TOKEN=$HF_TOKEN" in args and "--set-env=HF_TOKEN=$CHENV_HF_TOKEN" in args
    assert "--unset-env=[!C]*" in args and "--unset-env=CHENV_*" in args and "hf_secretValue" not in str(args)
    root = "/" + tmp_path.parts[1]  # the root's skeleton first, then the project at its own path
    skeleton = f"{tmp_path}/resources/container/scratch/mounts{root}:{root}"
    assert args.index(skeleton) < args.index(f"{tmp_path}:{tmp_path}")
    assert workflow_container.container_environment(cfg, {"HF_TOKEN": "t"}) == {}  # ch-run copies it itself


IN_IMAGE_STAGES = {"build_demo_model", "prepare_data", "preflight", "train", "merge", "evaluate"}


def stage_of(call: dict) -> str:
    inner = call["argv"][call["argv"].index(next(a for a in call["argv"] if a.endswith(".sif"))) + 1:]
    script = next(a for a in inner if a.endswith(".py") and "/scripts/" in a and "launch" not in a)
    return {"build_demo_model": "build_demo_model", "prepare_data": "prepare_data", "preflight": "preflight",
            "train": "train", "merge": "merge", "evaluate": "evaluate"}[Path(script).stem]


def test_the_demo_runs_each_stack_stage_through_the_runtime_with_nv_cleanenv_binds_and_env(container_demo):
    workdir = container_demo["workdir"]
    run = workdir / "results" / "demo"
    assert (run / "manifest.json").is_file() and (run / "merged" / "model.safetensors").is_file()
    calls = [c for c in container_demo["calls"] if c["argv"][0] == "exec"]
    assert {stage_of(c) for c in calls} == IN_IMAGE_STAGES and len(calls) == len(IN_IMAGE_STAGES)
    image = workdir / "resources" / "container" / "finetune.sif"
    assert image.is_symlink() and image.resolve() == container_demo["image"].resolve()
    scratch = workdir / "resources" / "container" / "scratch"
    for call in calls:
        opts, rest = container_standin.parse(call["argv"][1:])
        assert "--nv" in opts and "--cleanenv" in opts, call["argv"]
        assert rest[0] == str(image)
        binds = opts["--bind"]
        for needed in (workdir, REPO):
            assert any(str(needed) == b or str(needed).startswith(b + "/") for b in binds), (needed, binds)
        env = dict(pair.split("=", 1) for pair in opts["--env"])
        assert env["HF_HOME"] == str(scratch / "cache" / "huggingface")
        assert env["TRITON_CACHE_DIR"] == str(scratch / "cache" / "triton")
        assert env["XDG_CACHE_HOME"] == str(scratch / "cache")
        assert call["env"] == {"APPTAINERENV_HF_TOKEN": SECRET}  # the token through the environment ...
        assert SECRET not in json.dumps(call["argv"])  # ... never on the command line
        for arg in rest[1:]:  # every file the inner command names lies under a bind
            if "/" in arg and not arg.startswith("-") and not arg.startswith(("{", "[")):
                target = (Path(call["cwd"]) / arg).absolute()
                assert any(str(target).startswith(b.rstrip("/") + "/") for b in binds), (arg, binds)


def test_the_model_fetch_and_summary_stay_on_the_host(container_demo):
    logs = container_demo["workdir"] / "results" / "demo" / "logs"
    for stage in ("model", "summary"):
        assert (logs / f"{stage}.log").is_file()
    inner = " ".join(" ".join(c["argv"]) for c in container_demo["calls"])
    assert "prepare_model.py" not in inner and "summary.py" not in inner


def test_no_file_of_the_container_demo_holds_the_token(container_demo):
    leaks = [str(p) for p in container_demo["workdir"].rglob("*") if p.is_file() and not p.is_symlink()
             and SECRET.encode() in p.read_bytes()]
    assert leaks == []


def test_a_new_image_reruns_the_stages_in_it_only_when_retrain_on_new_image(container_demo):
    workdir, path = container_demo["workdir"], container_demo["path"]
    config = container_demo["config"]
    env = {"STANDIN_LOG": str(container_demo["log"])}
    run = functools.partial(snakemake, workdir, path=path, env=env, profile="apptainer")
    assert planned_jobs(run("--dry-run", "--config", *config)) == set()
    forced = ["--dry-run", "--forcerun", "container_image", "--config", *config]
    assert planned_jobs(run(*forced)) == IN_IMAGE_STAGES | {
        "container_image", "model", "summary", "plots", "all"}
    assert planned_jobs(run(*forced, "container__retrain_on_new_image=false")) == {"container_image"}
    # a changed pin of the image (here: another path) re-runs the container stage by itself
    other = container_standin.make_sif(container_demo["image"].parent / "other.sif", payload=b"other\n" * 9000)
    changed = [c for c in config if not c.startswith(("container__path", "container__sha256"))]
    changed += [f"container__path={other}", "container__retrain_on_new_image=false"]
    assert planned_jobs(run("--dry-run", "--config", *changed)) == {"container_image"}


def test_lfs_and_build_sources_through_the_workflow(sif, parts_repo, tmp_path):
    """The container rule itself, run by Snakemake (target container_image), with the stand-in runtime on PATH:
    lfs fetches the pinned parts; a moved branch is noticed only with lfs.update; build rebuilds when the def
    changes."""
    workdir = project(tmp_path)
    bindir = tmp_path / "standin-bin"
    container_standin.install(bindir)
    path = f"{bindir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    env = {"STANDIN_LOG": str(tmp_path / "standin.jsonl"), "STANDIN_BUILD_ALLOW": "fakeroot"}
    run = functools.partial(snakemake, workdir, path=path, env=env, profile="apptainer")
    lfs = ["--config", f"container__lfs__url={parts_repo.url}"]
    image = workdir / "resources" / "container" / "finetune.sif"
    run("container_image", *lfs)
    record = json.loads(Path(f"{image}.json").read_text())
    assert image.read_bytes() == sif.read_bytes() and record["commit"] == git(parts_repo.work, "rev-parse", "HEAD")
    update = [*lfs, "container__lfs__update=true"]
    assert planned_jobs(run("container_image", "--dry-run", *update)) == set()  # asked, but the remote did not move
    newer = container_standin.make_sif(tmp_path / "newer.sif", payload=b"newer\n" * 7000)
    parts_repo.publish(newer)
    assert planned_jobs(run("container_image", "--dry-run", *lfs)) == set()  # not asked: no network, nothing noticed
    assert planned_jobs(run("container_image", "--dry-run", *update)) == {"container_image"}
    run("container_image", *update)
    assert image.read_bytes() == newer.read_bytes()

    definition = tmp_path / "finetune.def"
    shutil.copy(DEF, definition)
    build = ["--config", "container__source=build", f"container__definition={definition}"]
    run("container_image", *build)
    assert json.loads(Path(f"{image}.json").read_text())["build_mode"] == "fakeroot"
    assert planned_jobs(run("container_image", "--dry-run", *build)) == set()
    os.utime(definition, (time.time() + 5, time.time() + 5))  # touched, same content: Snakemake's checksum
    assert planned_jobs(run("container_image", "--dry-run", *build)) == set()
    definition.write_text(definition.read_text() + "# a change\n")
    assert planned_jobs(run("container_image", "--dry-run", *build)) == {"container_image"}  # the def changed
