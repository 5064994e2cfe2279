"""Shared fixtures. Heavy artifacts (the tiny model, a trained adapter, the demo run) are built once per session
and shared by the tests that inspect them: every process that imports trl/peft pays ~8 s."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
DEMO_DATA = REPO / "data" / "demo" / "medical_qa.jsonl"
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(REPO / "workflow"))

# No test may reach the network: every hub client stays offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


# --- helpers shared by the merge and evaluate tests ---------------------------------------------------------


def make_adapter(base_dir: Path, out: Path, seed: int = 0, scale: float = 0.05, **lora: object) -> Path:
    """A LoRA adapter as the train stage saves it (adapter files + tokenizer), with seeded non-zero lora_B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM", **lora
    )
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_input(kind: str, path: Path, rows: list[dict]) -> Path:
    """The rows as a dataset of one kind the data stage reads, in directory `path`; returns dataset.path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "json_array":
        (path := path / "data.json").write_text(json.dumps(rows, indent=2))
    elif kind == "json_lines":
        path = write_rows(path / "data.json", rows)
    elif kind == "jsonl":
        path = write_rows(path / "data.jsonl", rows)
    elif kind == "csv":
        with open(path := path / "data.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path := path / "data.parquet")
    elif kind in ("arrow_file", "arrow_stream"):
        table = pa.Table.from_pylist(rows)
        new = pa.ipc.new_file if kind == "arrow_file" else pa.ipc.new_stream
        with pa.OSFile(str(path := path / "data.arrow"), "wb") as sink, new(sink, table.schema) as writer:
            writer.write_table(table)
    else:
        import datasets

        ds = datasets.Dataset.from_list(rows)
        if kind == "dataset_dict":
            ds = datasets.DatasetDict(train=ds.select(range(2)), test=ds)
        ds.save_to_disk(str(path := path / "saved"))
    return path


def demo_rows(start: int, stop: int) -> list[dict]:
    lines = DEMO_DATA.read_text().splitlines()[start:stop]
    return [json.loads(line) for line in lines]


# --- running the workflow in a project directory -------------------------------------------------------------


def workflow_command(*args: str, profile: str = "local", env: dict | None = None,
                     path: str | None = None) -> tuple[list[str], dict]:
    """The snakemake command line with one of the repository's profiles, and its environment: this environment's
    tools first on PATH (or `path`), `env` added."""
    environ = os.environ | {"PATH": path or f"{Path(sys.executable).parent}:{os.environ['PATH']}"} | (env or {})
    return [*SNAKEMAKE, "--profile", str(REPO / "profiles" / profile), "--cores", "2", *args], environ


def run_workflow(workdir: Path, *args: str, profile: str = "local", env: dict | None = None,
                 path: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """snakemake (workflow_command) in `workdir`; a failure fails the test unless check is false."""
    cmd, environ = workflow_command(*args, profile=profile, env=env, path=path)
    result = subprocess.run(cmd, cwd=workdir, env=environ, capture_output=True, text=True)
    if check and result.returncode != 0:
        pytest.fail(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


DEMO_SECRET = "hf_e2eTestTokenNeverWrittenAnywhere0123"  # in the environment of the demo run; no file may hold it


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


def planned_jobs(result: subprocess.CompletedProcess) -> set[str]:
    """Rule names from the 'Job stats' table of a dry run; empty when there is nothing to do."""
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return set()
    table = text.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m.group(1) for m in re.finditer(r"^(\w+)\s+\d+\s*$", table, re.M)} - {"job"}


# --- an S3-protocol server on loopback ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3-protocol server on loopback (an on-prem object store stand-in for the protocol)."""
    server = Path(sys.executable).parent / "moto_server"
    if not server.exists():
        pytest.fail("moto_server is missing: pip install -r requirements-dev.txt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint + "/", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(10)


def s3_put(endpoint: str, path: str, data: bytes = b"") -> None:
    request = urllib.request.Request(f"{endpoint}/{path}", data=data, method="PUT",
                                     headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(request, timeout=10)


def moto_auth(endpoint: str, free_requests: str) -> None:
    """Turn moto's IAM authorisation on ("0": every request must carry a valid SigV4 signature of a known key with
    a policy that allows it) or off ("inf")."""
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=free_requests.encode(),
                                                  method="POST", headers={"Content-Type": "text/plain"}), timeout=10)


def s3_key(endpoint: str, user: str, actions: list[str], resources: list[str]) -> dict:
    """An IAM user of the server with a policy that allows `actions` on `resources`; its access key (AccessKeyId,
    SecretAccessKey). Set up before moto_auth turns the checks on."""
    import boto3  # moto's own dependency

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                       aws_secret_access_key="setup")
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": resources}]}
    iam.put_user_policy(UserName=user, PolicyName=f"{user}-policy", PolicyDocument=json.dumps(policy))
    return iam.create_access_key(UserName=user)["AccessKey"]
