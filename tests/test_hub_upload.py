"""The Hub upload stage with the real huggingface_hub client against the Hub-protocol server on loopback
(support/hub_server.py): two repositories with their cards, files read back with snapshot_download, re-runs that
send nothing, an upload killed half-way that completes on the next run, server errors tried again, and the errors a
person gets for a missing, wrong or read-only token, a namespace they may not write, or a name taken by a dataset."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import hub_upload
import pytest
from hpc_finetune.io.cli import StageError
from support.common import SCRIPTS

TOKEN = "hf_uploadTestTokenNeverWritten0123456789"
READ_ONLY = "hf_readOnlyTestToken0123456789abcdef"


@pytest.fixture
def hub(hub_endpoint, monkeypatch):
    """The server with this test's tokens; the client in this process online (the suite is offline) and on the
    plain LFS protocol."""
    from huggingface_hub import constants

    endpoint, state = hub_endpoint
    state.add_token(TOKEN, "alice", "write", ("lab",))
    state.add_token(READ_ONLY, "alice", "read", ("lab",))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return endpoint, state


def finished_run(root: Path, shard_kb: int = 600) -> Path:
    """A run directory as the stages leave it: a hub base model with a license in its card, a data report from
    a hub dataset, evaluate metrics, an adapter (PEFT's own README and training_args.bin among it) and a merged
    model in two shards (above the server's multipart size)."""
    run = root / "run"
    base = root / "base"
    for d in ("adapters", "merged", "model", "data", "metrics"):
        (run / d).mkdir(parents=True)
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# base\n")
    (run / "model" / "model.json").write_text(json.dumps(
        {"source": "hub", "model_id": "acme/base-1b", "path": str(base), "commit": "a" * 40}))
    (run / "data" / "report.json").write_text(json.dumps(
        {"source": "acme/med-qa", "format": "messages", "input_rows": 120, "kept": 118,
         "dropped": {"empty": 1, "duplicate": 1, "too_long": 0}, "train_rows": 106, "eval_rows": 12,
         "origin": {"kind": "hub", "repo_id": "acme/med-qa", "revision": "main", "commit": "b" * 40}}))
    (run / "metrics" / "evaluate.json").write_text(json.dumps(
        {"base_eval_loss": 3.5, "finetuned_eval_loss": 1.25, "base_perplexity": 33.1, "finetuned_perplexity": 3.49,
         "eval_exact_match": 0.5, "eval_loss_rows": 12}))
    (run / "adapters" / "adapter_config.json").write_text('{"r": 16, "peft_type": "LORA"}')
    (run / "adapters" / "adapter_model.safetensors").write_bytes(os.urandom(40_000))
    (run / "adapters" / "README.md").write_text("---\nbase_model: /home/me/private/path\n---\n")
    (run / "adapters" / "training_args.bin").write_bytes(b"pickle")
    (run / "merged" / "config.json").write_text('{"model_type": "llama"}')
    for n in (1, 2):
        (run / "merged" / f"model-0000{n}-of-00002.safetensors").write_bytes(os.urandom(shard_kb << 10))
    (run / "merged" / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (run / "manifest.json").write_text(json.dumps(
        {"run_name": "med", "workflow_commit": "c" * 40, "config": {"training_lora_r": 16, "training_quantization":
                                                                      "4bit", "training_learning_rate": 0.0002}}))
    return run


def config(run: Path, endpoint: str, repo: str, **overrides) -> hub_upload.Config:
    options = {"retry_wait_s": 0.05, "endpoint": endpoint} | overrides
    return hub_upload.Config(repo_id=repo, manifest=str(run / "manifest.json"),
                             model_json=str(run / "model" / "model.json"), data_report=str(run / "data" / "report.json"),
                             evaluate=str(run / "metrics" / "evaluate.json"), record_out=str(run / "hub_upload.json"),
                             adapters=str(run / "adapters"), merged=str(run / "merged"), **options)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_both_repositories_hold_the_run_with_their_cards_and_a_rerun_sends_nothing(hub, tmp_path):
    from huggingface_hub import ModelCard, snapshot_download

    endpoint, state = hub
    run = finished_run(tmp_path)
    before = dict(state.received)
    record = hub_upload.main(config(run, endpoint, "lab/med-lora"))
    assert [r["repo"] for r in record["repos"]] == ["lab/med-lora", "lab/med-lora-merged"]
    assert state.received["lfs_objects"] - before["lfs_objects"] == 3  # the adapter and both shards
    assert state.repos[("model", "lab/med-lora")].private  # private by default
    for kind, repo in (("adapters", record["repos"][0]), ("merged", record["repos"][1])):
        local = snapshot_download(repo["repo"], revision=repo["commit"], cache_dir=tmp_path / "cache",
                                  endpoint=endpoint, token=TOKEN)
        got = {p.relative_to(local).as_posix(): sha256(p) for p in Path(local).rglob("*") if p.is_file()}
        expected = {p.name: sha256(p) for p in (run / kind).iterdir() if p.name not in ("README.md",
                                                                                          "training_args.bin")}
        assert {k: v for k, v in got.items() if k not in ("README.md", ".gitattributes")} == expected
        assert {f["path"]: f["sha256"] for f in repo["files"]} == {k: v for k, v in got.items()
                                                                    if k != ".gitattributes"}
        card = ModelCard.load(Path(local) / "README.md").data.to_dict()
        assert card["base_model"] == "acme/base-1b" and card["license"] == "apache-2.0"
        assert card["datasets"] == ["acme/med-qa"] and card["pipeline_tag"] == "text-generation"
        text = (Path(local) / "README.md").read_text()
        assert "/home/me/private" not in text and str(tmp_path) not in text
        assert "| held-out loss | 3.5 | 1.25 |" in text and "| train rows | 106 |" in text
        if kind == "adapters":
            assert card["library_name"] == "peft" and card["base_model_relation"] == "adapter"
            assert "vllm serve acme/base-1b --enable-lora --lora-modules med-lora=lab/med-lora" in text
        else:
            assert card["library_name"] == "transformers" and card["base_model_relation"] == "finetune"
            assert "vllm serve lab/med-lora-merged" in text
    assert json.loads((run / "hub_upload.json").read_text())["repos"][0]["commit"] == record["repos"][0]["commit"]

    sent = dict(state.received)
    again = hub_upload.main(config(run, endpoint, "lab/med-lora"))
    assert state.received == sent  # nothing sent, no commit made
    assert [r["commit"] for r in again["repos"]] == [r["commit"] for r in record["repos"]]
    assert {f["action"] for r in again["repos"] for f in r["files"]} == {"unchanged"}

    (run / "merged" / "model-00002-of-00002.safetensors").write_bytes(os.urandom(1000))
    (run / "merged" / "model-00001-of-00002.safetensors").rename(run / "merged" / "model.safetensors")
    changed = hub_upload.main(config(run, endpoint, "lab/med-lora"))
    merged = changed["repos"][1]
    assert [f["path"] for f in merged["files"] if f["action"] == "uploaded"] == [
        "model-00002-of-00002.safetensors", "model.safetensors"]
    assert merged["deleted"] == ["model-00001-of-00002.safetensors"]  # the branch holds exactly the run's files
    assert state.received["lfs_objects"] - sent["lfs_objects"] == 1  # the renamed shard's bytes were there already


def test_a_branch_is_created_and_the_commit_message_names_the_run(hub, tmp_path):
    endpoint, state = hub
    run = finished_run(tmp_path, shard_kb=10)
    record = hub_upload.main(replace(config(run, endpoint, "lab/branch-test", revision="run-7"), merged=None))
    repo = state.repos[("model", "lab/branch-test")]
    assert record["repos"][0]["revision"] == "run-7" and "run-7" in repo.branches
    assert repo.branches["run-7"] == record["repos"][0]["commit"] != repo.branches["main"]
    assert repo.messages[record["repos"][0]["commit"]] == "hpc-finetune run med: adapter (project commit cccccccccccc)"
    assert ("model", "lab/branch-test-merged") not in state.repos


def test_an_upload_killed_half_way_completes_on_the_next_run(hub, tmp_path):
    endpoint, state = hub
    run = finished_run(tmp_path)
    cfg = config(run, endpoint, "lab/killed")
    args = [sys.executable, str(SCRIPTS / "hub_upload.py")]
    for name, value in vars(cfg).items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env |= {"HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "PYTHONPATH": str(SCRIPTS)}
    state.held.clear()
    state.release.clear()
    state.hold_after = state.received["lfs_objects"] + 1  # the first LFS object arrives, the next one hangs
    before = state.received["lfs_objects"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert state.held.wait(60), proc.communicate(timeout=5)[0].decode()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        state.hold_after = None
        state.release.set()
    assert state.received["lfs_objects"] - before == 1
    assert not (run / "hub_upload.json").exists()
    assert "main" in state.repos[("model", "lab/killed")].branches  # created, nothing committed yet

    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert state.received["lfs_objects"] - before == 3  # the two missing objects, not the one already there
    record = json.loads((run / "hub_upload.json").read_text())
    tree = state.repos[("model", "lab/killed-merged")]
    files = tree.commits[tree.branches["main"]]
    for f in record["repos"][1]["files"]:
        if f["path"].endswith(".safetensors"):
            assert files[f["path"]].sha256 == f["sha256"] == sha256(run / "merged" / f["path"])
    assert TOKEN not in done.stdout + done.stderr


def test_server_errors_are_tried_again_a_bounded_number_of_times(hub, tmp_path, caplog):
    endpoint, state = hub
    run = finished_run(tmp_path, shard_kb=10)
    state.fail("/api/models/lab/flaky/commit/", 503, times=2)
    record = hub_upload.main(replace(config(run, endpoint, "lab/flaky"), merged=None))
    assert record["repos"][0]["commit"] == state.repos[("model", "lab/flaky")].branches["main"]
    assert "trying again in" in caplog.text and "(2 of 3)" in caplog.text

    (run / "hub_upload.json").write_text('{"kept": true}')
    (run / "adapters" / "adapter_config.json").write_text('{"r": 8}')
    state.fail("/api/models/lab/flaky/commit/", 500, times=10)
    with pytest.raises(StageError, match=r"failed after 2 tries .*500.* run again to send the rest"):
        hub_upload.main(replace(config(run, endpoint, "lab/flaky", retries=1), merged=None))
    state.failures.clear()
    assert json.loads((run / "hub_upload.json").read_text()) == {"kept": True}  # a failure leaves outputs alone


def test_errors_name_the_fix(hub, tmp_path, monkeypatch):
    endpoint, state = hub
    run = finished_run(tmp_path, shard_kb=10)
    cfg = replace(config(run, endpoint, "lab/errors", retries=0), merged=None)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(StageError, match="no Hub token. Export HF_TOKEN=<a token with write access>"):
        hub_upload.main(cfg)
    monkeypatch.setenv("HF_TOKEN", "hf_notAKnownToken0000000000")
    with pytest.raises(StageError, match=r"refused the token \(401.*invalid or expired.*settings/tokens"):
        hub_upload.main(cfg)
    monkeypatch.setenv("HF_TOKEN", READ_ONLY)
    with pytest.raises(StageError, match="the token of alice is read-only; uploading needs a token with write"):
        hub_upload.main(cfg)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(StageError, match=r"may not write there \(403.*namespace other.*repository under your own"):
        hub_upload.main(replace(cfg, repo_id="other/model"))
    state.add_token("hf_otherUsersToken00000000000000", "other")
    from huggingface_hub import HfApi

    HfApi(endpoint=endpoint, token="hf_otherUsersToken00000000000000").create_repo("other/data", repo_type="dataset")
    state.add_token("hf_sharedToken0000000000000000000", "bob", "write", ("other",))
    monkeypatch.setenv("HF_TOKEN", "hf_sharedToken0000000000000000000")
    with pytest.raises(StageError, match="other/data: .* has it as a dataset repository, not a model one"):
        hub_upload.main(replace(cfg, repo_id="other/data"))
    token_file = tmp_path / "token"
    token_file.write_text("two tokens\n")
    with pytest.raises(StageError, match=f"hub_upload.token_file {token_file} is empty or holds more than one"):
        hub_upload.main(replace(cfg, token_file=str(token_file)))
    with pytest.raises(StageError, match="failed after 1 tries .*Is http://127.0.0.1:9 reachable from this host"):
        hub_upload.main(replace(cfg, endpoint="http://127.0.0.1:9"))
    assert not (run / "hub_upload.json").exists()
    assert ("model", "lab/errors") not in state.repos
