"""Fixtures only (helpers live in tests/support). Heavy artifacts (the tiny model, the demo run) are built once per
session and shared by the tests that inspect them: every process that imports trl/peft pays ~8 s."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from hpc_finetune.io.files import sha256_file
from support import container_standin, slurm_cluster
from support.common import DEMO_DATA, DEMO_SECRET, REPO
from support.container import (
    CONTAINER_DEMO,
    PartsRepo,
    project,
    require_charliecloud,
    require_siftool,
    snakemake,
)
from support.cpu_features import simulate_cpu_without_avx512_bf16
from support.data import Run
from support.hub import Hub
from support.hub_server import hub_server
from support.s3 import moto_server
from support.workflow import run_workflow

# No test may reach the network: every hub client stays offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("SIMULATE_NO_AVX512_BF16") == "1":  # the verdicts of a CPU without AVX512-BF16, on this one
    simulate_cpu_without_avx512_bf16()


def pytest_collection_modifyitems(config, items):
    """The Slurm tests first. Every `snakemake` start loads the Slurm executor plugin, which runs
    `scontrol show config` for its help text whenever Slurm is installed: with no controller answering, that
    waits 10 s. Once test_slurm's session-scoped cluster is up, the answer takes milliseconds."""
    items.sort(key=lambda item: item.path.name != "test_slurm.py")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The demo's tiny Llama model and tokenizer, built from the shipped dataset (as the model stage does)."""
    import build_demo_model

    out = tmp_path_factory.mktemp("tiny-model") / "model"
    build_demo_model.main(build_demo_model.Config(data=str(DEMO_DATA), output=str(out)))
    return out


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tiny model's matrices are far too small to gain from threads; on 2 shared cores a second thread
    made training many times slower."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """A project directory as a user has it (config.yaml, data/), with the demo run completed in it."""
    workdir = tmp_path_factory.mktemp("project")
    (workdir / "config.yaml").write_text((REPO / "config.yaml").read_text())
    (workdir / "data").symlink_to(REPO / "data")
    run_workflow(workdir, env={"HF_TOKEN": DEMO_SECRET})
    return workdir


@pytest.fixture(scope="session")
def run_dir(demo) -> Path:
    return demo / "results" / "demo"


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-protocol server on loopback (support/s3.py)."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def hub_endpoint(tmp_path_factory):
    """The Hub-protocol server on loopback (support/hub_server.py): (endpoint, state). Tests use repositories of
    their own names; multipart LFS transfers from 256 KiB on."""
    with hub_server(tmp_path_factory.mktemp("hub-server"), multipart_chunk=256 << 10) as served:
        yield served


# --- the container tests --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def siftool() -> None:
    """Debian's siftool, which makes every SIF the container tests use: a skip without it, a failure with
    REQUIRE_SIFTOOL=1 (support/container.py)."""
    require_siftool()


@pytest.fixture(scope="session")
def sif(siftool, tmp_path_factory) -> Path:
    """A real SIF image (siftool)."""
    return container_standin.make_sif(tmp_path_factory.mktemp("sif") / "finetune.sif")


@pytest.fixture
def parts_repo(sif, tmp_path) -> PartsRepo:
    repo = PartsRepo(tmp_path / "lfs")
    repo.publish(sif, tag="v1")
    return repo


@pytest.fixture
def standin(siftool, tmp_path, monkeypatch) -> Path:
    """The stand-in `apptainer` first on PATH (its pull and build make SIFs with siftool); returns its log of
    calls."""
    container_standin.install(tmp_path / "standin-bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'standin-bin'}:{os.environ['PATH']}")
    log = tmp_path / "standin.jsonl"
    monkeypatch.setenv("STANDIN_LOG", str(log))
    return log


@pytest.fixture(scope="session")
def container_demo(siftool, tmp_path_factory):
    """The short demo with profiles/apptainer (container on), every stage that needs the stack run through the
    STAND-IN runtime (on the host): the container seam's command lines, and the host run the Charliecloud run's
    metrics are compared with."""
    root = tmp_path_factory.mktemp("container-demo")
    workdir = project(root)
    image = container_standin.make_sif(root / "images" / "finetune.sif")
    bindir = root / "standin-bin"
    container_standin.install(bindir)
    log = root / "standin.jsonl"
    path = f"{bindir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    config = ["container__source=path", *CONTAINER_DEMO, f"container__path={image}",
              f"container__sha256={sha256_file(image)}"]
    started = time.monotonic()
    snakemake(workdir, "--config", *config, path=path, env={"STANDIN_LOG": str(log)}, profile="apptainer")
    return {"workdir": workdir, "image": image, "config": config, "path": path, "wall_s": time.monotonic() - started,
            "calls": container_standin.records(log), "log": log}


@pytest.fixture(scope="session")
def cluster():
    """The real Slurm cluster on this machine (support/slurm_cluster.py), shared by every test that submits jobs:
    a skip where it cannot be had, a failure with REQUIRE_SLURM=1 (CI). Run such tests under
    `flock /work/slurm.lock`."""
    try:
        running = slurm_cluster.start()
    except slurm_cluster.Unavailable as err:
        if os.environ.get("REQUIRE_SLURM") == "1":
            pytest.fail(f"REQUIRE_SLURM=1 but no Slurm cluster: {err}")
        pytest.skip(f"no Slurm cluster: {err}")
    yield running
    running.stop()


@pytest.fixture(scope="session")
def cpu_image() -> dict:
    """The CPU image of the recipe (debootstrap, the lock's wheels, SquashFS in a SIF), built once per recipe hash
    and cached under ~/.cache/hpc-finetune/images (hpc_finetune.container.cpu_image): its record."""
    require_charliecloud()
    from hpc_finetune.container import cpu_image as builder

    return builder.build()


# --- the data stage's tests --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_json(tiny_model, tmp_path_factory) -> Path:
    """A model record of the tiny model: what the data stage reads its tokenizer from."""
    path = tmp_path_factory.mktemp("record") / "model.json"
    path.write_text(json.dumps({"path": str(tiny_model)}))
    return path


@pytest.fixture
def run(model_json, tmp_path) -> Run:
    """One in-process run of the data stage (support/data.py), outputs in tmp_path/out."""
    return Run(model_json, tmp_path / "out")


# --- the hub cache's tests ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def upload(tiny_model, tmp_path_factory) -> Path:
    """The demo model's files as a hub repository has them, with weight duplicates that must not be fetched."""
    directory = tmp_path_factory.mktemp("upload") / "model"
    shutil.copytree(tiny_model, directory)
    (directory / "pytorch_model.bin").write_bytes(os.urandom(40_000))
    (directory / "original").mkdir()
    (directory / "original" / "consolidated.00.pth").write_bytes(os.urandom(30_000))
    (directory / "original" / "params.json").write_text('{"dim": 64}\n')
    return directory


@pytest.fixture(scope="session")
def shared_hub(upload, tmp_path_factory) -> Hub:
    """One hub for the tests that only read it."""
    return Hub(tmp_path_factory.mktemp("hub"), upload)


@pytest.fixture
def hub(upload, tmp_path) -> Hub:
    """A hub of the test's own, for tests that change the remote."""
    return Hub(tmp_path / "hub", upload)


@pytest.fixture
def info_logs(caplog):
    """The library's INFO lines (logger "finetune") in caplog."""
    import logging

    caplog.set_level(logging.INFO, logger="finetune")
