"""Hub datasets at a pinned revision, with the real huggingface_hub client against the Hub-protocol server on
loopback: the revision resolved to a commit when the workflow starts, the commit fetched into the shared cache and
read as a repository-layout directory with its own splits, the commit in the data report, a moved branch or a new
revision planning the data stage again, the cache answering offline, and errors that name the key to fix."""

from __future__ import annotations

import io
import json

import fetch_dataset
import pytest
from hpc_finetune.io.cli import StageError
from hpc_finetune.workflow.config import ConfigError
from hpc_finetune.workflow.dataset import dataset_input
from support.common import REPO
from support.data import PC_ROWS
from support.workflow import planned_jobs, run_workflow

TOKEN = "hf_datasetReaderTestToken000000000000"


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def dataset(hub_endpoint, monkeypatch):
    """lab/qa on the server: train.jsonl and validation.jsonl on main, tagged v1; the client in this process
    online. Returns (endpoint, state, commit of v1)."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    endpoint, state = hub_endpoint
    state.add_token(TOKEN, "lab-bot", "write", ("lab",))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    api = HfApi(endpoint=endpoint, token=TOKEN)
    if ("dataset", "lab/qa") not in state.repos:
        api.create_repo("lab/qa", repo_type="dataset", private=True)
        api.create_commit("lab/qa", [CommitOperationAdd("train.jsonl", io.BytesIO(jsonl(PC_ROWS[:9]))),
                                     CommitOperationAdd("validation.jsonl", io.BytesIO(jsonl(PC_ROWS[9:])))],
                          commit_message="v1", repo_type="dataset")
        api.create_branch("lab/qa", branch="v1", repo_type="dataset")
    return endpoint, state, state.repos[("dataset", "lab/qa")].branches["v1"]


def config(tmp_path, endpoint, **dataset) -> dict:
    return {"dataset": {"path": "lab/qa", "revision": "main", "hub_url": endpoint,
                        "cache_dir": str(tmp_path / "cache"), **dataset}, "model": {"token_file": None}}


def fetch(cfg: dict, tmp_path) -> tuple:
    data = dataset_input(cfg, state_dir=str(tmp_path / "state"))
    fetch_config = {k: v for k, v in data.fetch.items() if k not in ("kind", "record")}
    record = fetch_dataset.main(fetch_dataset.Config(**fetch_config, record_out=data.fetch["record"]))
    return data, record


def test_the_pinned_commit_is_fetched_read_with_its_splits_and_reported(dataset, tmp_path, run):
    endpoint, state, v1 = dataset
    data, record = fetch(config(tmp_path, endpoint, revision="v1"), tmp_path)
    assert record["commit"] == v1 and data.path.endswith(f"/snapshots/{v1}") and data.inputs == [data.origin]
    report = run(data.path, origin=data.origin)
    assert report["eval_source"]["kind"] == "split" and report["eval_rows"] == 3 and report["train_rows"] == 9
    assert report["origin"] == {"kind": "hub", "repo_id": "lab/qa", "revision": "v1", "commit": v1,
                                "endpoint": endpoint, "source": "hf://datasets/lab/qa", "files": 3}
    assert sorted(r["completion"] for r in run.train) == sorted(r["completion"] for r in PC_ROWS[:9])


def test_a_moved_branch_or_another_revision_is_another_snapshot_and_the_cache_answers_offline(dataset, tmp_path,
                                                                                            monkeypatch):
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    endpoint, state, v1 = dataset
    first, _ = fetch(config(tmp_path, endpoint), tmp_path)
    assert first.fetch["commit"] == state.repos[("dataset", "lab/qa")].branches["main"]
    HfApi(endpoint=endpoint, token=TOKEN).create_commit(
        "lab/qa", [CommitOperationAdd("train.jsonl", io.BytesIO(jsonl(PC_ROWS[:6])))], commit_message="fewer rows",
        repo_type="dataset")
    moved, record = fetch(config(tmp_path, endpoint), tmp_path)
    assert record["commit"] != v1 and moved.path != first.path  # the data stage's input changes: it runs again
    by_commit = dataset_input(config(tmp_path, endpoint, revision=first.fetch["commit"]),
                              state_dir=str(tmp_path / "state"))
    assert by_commit.path == first.path  # a commit needs no question to the hub
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = dataset_input(config(tmp_path, endpoint), state_dir=str(tmp_path / "state"))
    assert offline.path == moved.path  # the commit the cache recorded for main
    with pytest.raises(ConfigError, match=r"cannot ask .* \(HF_HUB_OFFLINE is set\) .*has never fetched it"):
        dataset_input(config(tmp_path, endpoint, revision="never-fetched"), state_dir=str(tmp_path / "state"))


@pytest.mark.parametrize(("options", "message"), [
    ({"path": "lab/missing"}, "dataset.path lab/missing: no such dataset on .*, or it is private or gated"),
    ({"revision": "v9"}, "dataset.revision 'v9': no such branch, tag or commit in the dataset lab/qa"),
])
def test_errors_name_the_key(dataset, tmp_path, options, message):
    endpoint, _, _ = dataset
    with pytest.raises(ConfigError, match=message):
        dataset_input(config(tmp_path, endpoint, **options), state_dir=str(tmp_path / "state"))


def test_a_private_dataset_needs_a_token(dataset, tmp_path, monkeypatch):
    endpoint, _, _ = dataset
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ConfigError, match="no such dataset .* private or gated: give a token"):
        dataset_input(config(tmp_path, endpoint), state_dir=str(tmp_path / "state"))
    with pytest.raises(StageError, match="--revision and --commit are needed"):
        fetch_dataset.main(fetch_dataset.Config(source="hf://datasets/lab/qa", output="o", record_out="r"))


def test_the_workflow_plans_the_data_stage_again_for_a_new_revision(dataset, tmp_path):
    endpoint, _, _ = dataset
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    env = {"HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
    args = ("--config", "dataset__path=lab/qa", f"dataset__hub_url={endpoint}", "dataset__revision=v1")
    report = "results/demo/data/report.json"
    run_workflow(tmp_path, report, *args, env=env)
    assert json.loads((tmp_path / report).read_text())["origin"]["revision"] == "v1"
    assert planned_jobs(run_workflow(tmp_path, "-n", report, *args, env=env)) == set()
    moved = (*args[:-1], "dataset__revision=main")
    assert {"fetch_dataset", "prepare_data"} <= planned_jobs(run_workflow(tmp_path, "-n", report, *moved, env=env))
    failed = run_workflow(tmp_path, "-n", *args[:-1], "dataset__revision=nope", env=env, check=False)
    assert failed.returncode != 0 and "dataset.revision 'nope': no such branch" in failed.stderr
    assert not any(TOKEN.encode() in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
